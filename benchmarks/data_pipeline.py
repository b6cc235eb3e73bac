"""Input pipeline throughput: pairs records with one 384×384 JPEG each, through the full Grain pipeline.

    python benchmarks/data_pipeline.py [--records=256] [--workers=2] [--batch=8] [--repeats=3]

Writes a pairs dataset (SigLIP 384 px processor, a word-level tokenizer with a ChatML template, prompts of
64 words, answers of 128 words) once, then times iterating it — decode, validate, JPEG decode +
resize + normalize, tokenize, pack into shared-prefix rows, batch — with the given number of worker
processes, and reports the median records/s over --repeats passes (each pass builds a new iterator, so
worker start-up is included; the first batch is excluded). Compare with the DPO step's pairs/s on the
same machine (benchmarks/dpo_step.py).
"""

from __future__ import annotations

import io
import os
import statistics
import sys
import time

import numpy as np
from absl import app, flags
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from rdpo_jax.data import arrayrecord, pipeline  # noqa: E402
from rdpo_jax.models import hf, image_inputs  # noqa: E402
from rdpo_jax.data.tokenize import ChatTokenizer  # noqa: E402
from data_prep import smoke  # noqa: E402  (the smoke setup's words and tokenizer)
from rdpo_jax import testing  # noqa: E402

_RECORDS = flags.DEFINE_integer("records", 256, "Records in the dataset.")
_WORKERS = flags.DEFINE_integer("workers", 2, "Grain worker processes.")
_BATCH = flags.DEFINE_integer("batch", 8, "Pairs per batch.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Passes over the data (median reported).")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/bench_data", "Where the dataset is written.")


def _jpeg(rng) -> bytes:
    # smooth random image (compresses like a photo, unlike white noise)
    small = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize((384, 384), Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _words(rng, n):
    return " ".join(rng.choice(smoke.WORDS, n))


def main(argv):
    del argv
    import transformers

    folder = _WORKDIR.value
    data = os.path.join(folder, "pairs")
    if not os.path.exists(data + arrayrecord.MANIFEST_SUFFIX):
        os.makedirs(folder, exist_ok=True)
        smoke.tokenizer().save_pretrained(folder)
        transformers.SiglipImageProcessorPil(size={"height": 384, "width": 384}).save_pretrained(folder)
        rng = np.random.default_rng(0)
        rubric = {"criteria": [{"id": f"c{j}", "text": "criterion", "kind": "essential" if j < 2 else "additional",
                                "weight": 1.0, "scale": "binary"} for j in range(6)]}
        records = (dict(pair_id=f"{i}", prompt_id=f"{i}", images=[_jpeg(rng)],
                        messages=[{"role": "user", "content": [{"type": "image"},
                                                               {"type": "text", "text": _words(rng, 64)}]}],
                        chosen=_words(rng, 128), rejected=_words(rng, 127), rubric=rubric,
                        chosen_scores=[1] * 6, rejected_scores=[0] * 6, meta={}) for i in range(_RECORDS.value))
        arrayrecord.write(folder, "pairs", "pairs", records, num_shards=4)
    options = pipeline.Options(kind="pairs", seq_buckets=(1024,), max_answer_len=160, max_criteria=8)
    tok = ChatTokenizer(folder, image_token_id=testing.IMAGE_TOKEN)
    ds = pipeline.make_dataset(arrayrecord.Source(data), options, tok,
                               image_inputs.for_model(hf.read_config(folder), folder, max_images=1),
                               global_batch_size=_BATCH.value, seed=0, num_epochs=None, process_index=0,
                               process_count=1)
    n_batches = _RECORDS.value // _BATCH.value
    rates = []
    for _ in range(_REPEATS.value):
        it = pipeline.make_iterator(ds, workers=_WORKERS.value)
        first = next(it)
        assert first["batch"].images["pixel_values"].shape == (_BATCH.value, 1, 384, 384, 3)
        t0 = time.perf_counter()
        examples = sum(int(next(it)["stats"]["examples"]) for _ in range(n_batches - 1))
        rates.append(examples / (time.perf_counter() - t0))
        if hasattr(it, "close"):
            it.close()
    print(f"pipeline, {_WORKERS.value} workers, batch {_BATCH.value}: median {statistics.median(rates):.1f} records/s "
          f"over {len(rates)} passes ({', '.join(f'{r:.1f}' for r in rates)}); rows of "
          f"{first['batch']['input_ids'].shape[1]} tokens, images {first['batch']['pixel_values'].shape[2:]}")


if __name__ == "__main__":
    app.run(main)
