"""Writes a tiny but complete training setup for smoke runs and tests (nothing downloaded).

    python -m data_prep.smoke --out=DIR [--family=llava|qwen2_5_vl|qwen3_vl] [--pairs=32] [--sft=32] [--seed=0]

DIR/model      a Hugging Face model folder, a few thousand parameters per layer: config.json, random
               weights (model.safetensors), a word-level tokenizer with a ChatML chat template and the
               image processor: the family's tiny model (`models/<family>/tiny.py`; llava: SigLIP 32 px +
               Qwen2, one image per record; qwen2_5_vl: vision patch 4, window and full attention, M-RoPE,
               records holding 0, 1 or 2 images of different sizes; qwen3_vl: the same records, a tower with learned
               positions and DeepStack, interleaved M-RoPE).
DIR/pairs      rubric-scored preference pairs (ArrayRecord + manifest), DIR/pairs_eval held-out pairs
DIR/sft        SFT examples
DIR/prompts.jsonl, DIR/heldout_prompts.jsonl   8 and 6 prompts (images in DIR/images) with ground truth,
               for build_rubrics --generator=rule (the loop's smoke config builds its pools from them)
Texts are random words from a small vocabulary and images are random; the point is to exercise every
component with real files, not to learn anything.
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags

from rdpo_jax import testing
from rdpo_jax.models import families

WORDS = ("system user assistant describe the image a an one two three four five red green blue yellow "
         "circle square triangle star small large left right top bottom of in is are there how many what "
         "colour shape and with no yes object objects picture shows").split()


def tokenizer(family: str = "llava"):
    """The word-level tokenizer over `WORDS` (ChatML, `testing.tokenizer`); the family's vision tokens
    follow the words (Qwen-VL: ids 51…54)."""
    return testing.tokenizer(WORDS, family=family)


def write_model(folder: str, seed: int = 0, family: str = "llava", **text) -> None:
    """DIR/model (the module doc); `text`: decoder fields to override (a wider or deeper model for
    benchmarks, e.g. hidden_size=256)."""
    testing.write_model(folder, tokenizer(family), family=family, seed=seed, **text)


def _words(rng, n: int) -> str:
    return " ".join(rng.choice(WORDS[3:], n))


def _messages(rng, images: int = 1) -> list[dict]:
    parts = [{"type": "image"}] * images + [{"type": "text", "text": _words(rng, 3)}]
    return [{"role": "user", "content": parts}]


def _images(rng, family: str) -> list[bytes]:
    return families.get(family).tiny.smoke_images(rng, testing.png)


def pair(rng, i: int, family: str = "llava") -> dict:
    k = 3
    rubric = {"criteria": [{"id": f"c{j}", "text": _words(rng, 2), "kind": "essential" if j == 0 else "additional",
                            "weight": 1.0, "scale": "binary"} for j in range(k)]}
    chosen_scores = [1, int(rng.integers(0, 2)), 1]
    rejected_scores = [0, int(rng.integers(0, 2)), int(rng.integers(0, 2))]
    images = _images(rng, family)
    return dict(pair_id=f"pair{i}", prompt_id=f"p{i}", images=images, messages=_messages(rng, len(images)),
                chosen=_words(rng, 4), rejected=_words(rng, 3), rubric=rubric, chosen_scores=chosen_scores,
                rejected_scores=rejected_scores, meta={"source": "smoke"})


def sft_example(rng, family: str = "llava") -> dict:
    images = _images(rng, family)
    return dict(images=images, messages=_messages(rng, len(images)), answer=_words(rng, 5))


def write_data(out: str, *, pairs: int, sft: int, seed: int, family: str = "llava") -> None:
    from rdpo_jax.data import arrayrecord

    rng = np.random.default_rng(seed)
    arrayrecord.write(out, "pairs", "pairs", [pair(rng, i, family) for i in range(pairs)], num_shards=2)
    arrayrecord.write(out, "pairs_eval", "pairs", [pair(rng, pairs + i, family) for i in range(max(pairs // 4, 2))])
    arrayrecord.write(out, "sft", "sft", [sft_example(rng, family) for _ in range(sft)], num_shards=2)


def write_prompts(out: str, name: str = "prompts", n: int = 6, seed: int = 0) -> str:
    """`build_rubrics` input: OUT/NAME.jsonl, n prompts describing random 24×24 images (OUT/images/), each
    with ground truth for the rule generator and verifier (a colour to mention, a detail, an absent colour to
    avoid, a word budget). Returns the JSONL path."""
    import json

    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = ["red", "green", "blue", "yellow"]
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    with open(os.path.join(out, name + ".jsonl"), "w") as f:
        for i in range(n):
            image = f"images/{name}-{i}.png"
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(os.path.join(out, image))
            truth = {"mentions": [colours[i % 4]], "details": ["circle"], "absent": [colours[(i + 1) % 4]],
                     "max_words": 8}
            f.write(json.dumps({"prompt_id": f"p{i}", "image": image, "instruction": "describe the image",
                                "ground_truth": truth}) + "\n")
    return os.path.join(out, name + ".jsonl")


def write_setup(out: str, *, pairs: int = 32, sft: int = 32, seed: int = 0, family: str = "llava") -> None:
    """Everything the module doc lists, in OUT."""
    write_model(os.path.join(out, "model"), seed=seed, family=family)
    write_data(out, pairs=pairs, sft=sft, seed=seed, family=family)
    write_prompts(out, "prompts", n=8, seed=seed)
    write_prompts(out, "heldout_prompts", n=6, seed=seed + 1)


# Checked in main, not by absl: programs that import this module as a library (benchmarks) parse flags too.
_OUT = flags.DEFINE_string("out", None, "Output folder (required).")
_PAIRS = flags.DEFINE_integer("pairs", 32, "Training pairs.")
_SFT = flags.DEFINE_integer("sft", 32, "SFT examples.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for weights and data.")
_FAMILY = flags.DEFINE_enum("family", "llava", list(families.FAMILIES), "The model family.")


def main(argv):
    del argv
    if not _OUT.value:
        raise app.UsageError("--out is required")
    write_setup(_OUT.value, pairs=_PAIRS.value, sft=_SFT.value, seed=_SEED.value, family=_FAMILY.value)
    print(f"wrote {_OUT.value}/model, pairs, pairs_eval, sft, prompts.jsonl, heldout_prompts.jsonl")


if __name__ == "__main__":
    app.run(main)
