"""How much of a batch is padding, one prompt group per multi-answer row or several (`data.groups_per_row`),
and what packing buys in step time.

    python benchmarks/padding.py [--groups=256] [--batch=16] [--per_row=1,2,4] [--buckets=1024,2048]
    python benchmarks/padding.py --data=RUN/pairs --config=CONFIG.py [--per_row=1,2,4]   # a real dataset (DPO or SFT)
    python benchmarks/padding.py --time [--groups=48] [--batch=8]                         # + DPO step time

Synthetic mix (default; an on-policy round of a LLaVA-style model): every prompt a 576-token image and an
instruction of log-normal length (median 48 tokens, 8 … 256), 8 samples mined into 1 … 3 pairs sharing
their chosen answer (2 … 4 distinct answers), answers of log-normal length (median 100 tokens, 8 … 400, cut
to --max_answer_len). The records go through the pipeline's own `Collate` (the code training runs);
`--data` instead reads a groups (or pairs) dataset through the whole pipeline of a training config
(tokenizer, images: e.g. the demo's round data after `make_pairs --format=groups`).

Printed per groups_per_row: rows per batch, the token padding share (1 − tokens / row slots, what the
trainer logs as `token_padding`), row slots per pair. With `--time` (synthetic mix), the DPO step
(sigmoid, online reference, fp32; `benchmarks/dpo_step.py`'s LLaVA model) runs over the same records at
every groups_per_row, each batch shape compiled first, and prints pairs/s over the pass (medians of
--rounds passes, interleaved).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags
from ml_collections import config_flags

_GROUPS = flags.DEFINE_integer("groups", 256, "Synthetic prompt groups.")
_BATCH = flags.DEFINE_integer("batch", 16, "Records (prompt groups) per batch (synthetic mix; --data: the config's).")
_PER_ROW = flags.DEFINE_list("per_row", ["1", "2", "4"], "groups_per_row values to compare.")
_BUCKETS = flags.DEFINE_list("buckets", ["1024", "2048"], "Row length buckets (synthetic mix).")
_MAX_ANSWER = flags.DEFINE_integer("max_answer_len", 256, "Answers cut to this many tokens (synthetic mix).")
_DATA = flags.DEFINE_string("data", "", "A groups or pairs dataset (with --config) instead of the synthetic mix.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "The training config of --data (its model, buckets, answer "
                                          "length, batch size; --config.x=… overrides as for training).")
_TIME = flags.DEFINE_bool("time", False, "Also time the DPO step over the synthetic records at each groups_per_row.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "With --time: interleaved passes (median reported).")

sys.path.insert(0, str(Path(__file__).resolve().parent))
IMAGE, PAIRS = 576, 3


def synthetic_examples(n: int, rng, pixels: bool) -> list[dict]:
    """Prepared examples (what the pipeline's `Prepare` gives `Collate`) of the synthetic mix."""
    from rdpo_jax.batch import RUBRIC_KEYS

    def length(median, low, high):
        return int(np.clip(rng.lognormal(np.log(median), 0.6), low, high))

    out = []
    for i in range(n):
        prompt = np.array([1] + [8191] * IMAGE + list(rng.integers(2, 8000, length(48, 8, 256))), np.int32)
        pairs = int(rng.integers(1, PAIRS + 1))
        answers = [rng.integers(2, 8000, length(100, 8, 400)).astype(np.int32) for _ in range(pairs + 1)]
        images = ({"pixels": rng.standard_normal((1, 336, 336, 3)).astype(np.float32), "tokens": [IMAGE]}
                  if pixels else None)
        ex = {"prompt": prompt, "answers": answers, "pairs": [(0, j + 1) for j in range(pairs)], "images": images,
              "positions": None, "index": i}
        ex.update({k: np.zeros((pairs, 1), np.float32) for k in RUBRIC_KEYS})
        out.append(ex)
    return out


def synthetic_batches(examples, per_row: int, pixels: bool) -> list[dict]:
    from rdpo_jax.data import images, pipeline
    from rdpo_jax.models.llava.inputs import FixedImages

    options = pipeline.Options(kind="pairs", seq_buckets=tuple(int(b) for b in _BUCKETS.value),
                               max_answer_len=_MAX_ANSWER.value, max_criteria=1, max_pairs_per_group=PAIRS,
                               max_answers_per_group=PAIRS + 1, pair_layout="multi_answer", groups_per_row=per_row)
    image_input = FixedImages(images.ImageConfig(height=336, width=336) if pixels else None,
                              tokens_per_image=IMAGE, max_images=int(pixels))
    collate = pipeline.Collate(options, _BATCH.value, 0, image_input, kind="groups")
    B = _BATCH.value
    return [collate(examples[s:s + B]) for s in range(0, len(examples) - B + 1, B)]


def dataset_batches(per_row: int) -> list[dict]:
    from rdpo_jax.data import arrayrecord, pipeline
    from rdpo_jax.data.tokenize import ChatTokenizer
    from rdpo_jax.models import hf, image_inputs

    config = _CONFIG.value.copy_and_resolve_references()
    config.data.groups_per_row = per_row
    if config.objective == "dpo":
        config.dpo.pair_layout = "multi_answer"
    model_config = hf.read_config(config.model.path)
    options = pipeline.Options.from_config(config)
    tokenizer = ChatTokenizer(config.model.path, image_token_id=model_config.image_token_id)
    dataset = pipeline.make_dataset(arrayrecord.Source(_DATA.value), options, tokenizer,
                                    image_inputs.from_config(config, model_config),
                                    global_batch_size=config.data.batch_size,
                                    seed=None, num_epochs=1, process_index=0, process_count=1)
    return [dataset[i] for i in range(len(dataset))]


def report(per_row: int, elements: list[dict]) -> dict:
    tokens = sum(int((e["batch"].branch_ids >= 0).sum()) for e in elements)
    slots = sum(e["batch"].branch_ids.size for e in elements)
    pairs = sum(int(e["stats"]["examples"]) for e in elements)  # pairs (DPO) or examples (SFT)
    shapes = sorted({e["batch"].input_ids.shape for e in elements})
    what = "examples" if elements[0]["batch"].chosen_scores is None else "pairs"
    print(f"groups_per_row={per_row}: {len(elements)} batches, row shapes {shapes}; {pairs} {what}, {tokens} tokens "
          f"in {slots} row slots: padding {1 - tokens / slots:.1%}, {slots / pairs:.0f} slots per {what[:-1]}")
    return {"slots": slots, "pairs": pairs}


def time_steps(batches: dict[int, list[dict]]) -> None:
    import jax
    import optax

    import dpo_step  # the benchmark model (its flags: --width, --layers)
    from rdpo_jax import optim, sharding, train_step
    from rdpo_jax.models import families

    cfg, run = dpo_step.model_config()
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    optimizer = optim.make_optimizer(learning_rate=1e-5, weight_decay=0.0)
    graphdef, state = train_step.init_state(families.create(cfg, run, mesh=mesh, seed=0), optimizer, reference=True)
    fn = train_step.make_dpo_step(graphdef, optimizer, optax.constant_schedule(1e-5), train_step.DPOSettings(
        loss_type="sigmoid", beta=0.1, pair_layout="multi_answer")).train
    compiled, times = {}, {k: [] for k in batches}
    for k, elements in batches.items():
        for e in elements:
            b = e["batch"]
            key = b.sizes()
            if key not in compiled:
                t0 = time.perf_counter()
                compiled[key] = train_step.jit_step(fn, state, b, mesh).lower(state, b).compile()
                print(f"  compiled rows {b.input_ids.shape} in {time.perf_counter() - t0:.1f}s", flush=True)
            e["step"] = compiled[key]
            e["device"] = jax.device_put(b, b.shardings(mesh))
    losses = {}
    for r in range(_ROUNDS.value + 1):  # round 0 warms every program up
        for k, elements in batches.items():
            t0 = time.perf_counter()
            for e in elements:
                state, metrics = e["step"](state, e["device"])
                if r == 0 and e is elements[0]:
                    losses[k] = float(metrics["loss"])
            jax.block_until_ready(state.params)
            if r:
                times[k].append(time.perf_counter() - t0)
                print(f"  pass {r}, groups_per_row={k}: {times[k][-1]:.1f} s", flush=True)
    base = statistics.median(times[min(times)])
    for k, t in times.items():
        pairs = sum(int(e["batch"].valid.sum()) for e in batches[k])
        print(f"groups_per_row={k}: {pairs / statistics.median(t):.3f} pairs/s (median of {len(t)} passes, "
              f"{min(t):.1f} … {max(t):.1f} s), {base / statistics.median(t):.2f}× groups_per_row={min(times)}")


def main(argv):
    del argv
    per_row = [int(k) for k in _PER_ROW.value]
    if _DATA.value:
        if _CONFIG.value is None:
            raise app.UsageError("--data needs --config (its model and buckets)")
        for k in per_row:
            report(k, dataset_batches(k))
        return
    rng = np.random.default_rng(0)
    examples = synthetic_examples(_GROUPS.value, rng, pixels=_TIME.value)
    print(f"synthetic mix: {len(examples)} prompt groups, batches of {_BATCH.value}, buckets {_BUCKETS.value}, "
          f"answers cut to {_MAX_ANSWER.value}")
    batches = {k: synthetic_batches(examples, k, pixels=_TIME.value) for k in per_row}
    for k in per_row:
        report(k, batches[k])
    if _TIME.value:
        time_steps(batches)


if __name__ == "__main__":
    app.run(main)
