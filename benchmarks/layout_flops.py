"""The pair log-likelihood forward's FLOPs per pair in each row layout, at a preset's full size (traced, never
compiled or run: no memory).

    python benchmarks/layout_flops.py --model=qwen3.5-27b [--prompt=1024] [--image=576] [--answer=256]
    python benchmarks/layout_flops.py --model=qwen3-vl-8b       # any preset of presets.py

The same prompts (one `--image`-token image, then text up to `--prompt` tokens) and `--answer`-token answers,
as `logps.pair_logps` reads them in each layout: concat (two rows [prompt][answer] a pair, the pair's
images encoded once), shared_prefix (one row [prompt][chosen][rejected]) and multi_answer (one row
[prompt][a0][a1][a2][a3] and the 6 pairs of its 4 answers; with 3 pairs, as `benchmarks/groups.py` mines
them, the FLOPs per pair double). FLOPs are the matmuls through every loop (`analysis.matmul_flops`:
scanned layers, the DeltaNet's chunk scan, the causal attention's query blocks as traced on this host),
counted on the vision tower and the decoder together; the ratio is concat / layout.
"""

from __future__ import annotations

import io
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from PIL import Image

from rdpo_jax import logps, packing
from rdpo_jax.compile import analysis
from rdpo_jax.models import config as config_lib
from rdpo_jax.models import families, image_inputs
import presets  # benchmarks/presets.py

_MODEL = flags.DEFINE_enum("model", "qwen3.5-27b", list(presets.NAMES), "Architecture (presets.py).")
_PROMPT = flags.DEFINE_integer("prompt", 1024, "Prompt tokens, the image's included.")
_IMAGE = flags.DEFINE_integer("image", 576, "Image tokens in the prompt (a square of merged tokens).")
_ANSWER = flags.DEFINE_integer("answer", 256, "Tokens per answer.")
_PAIRS = flags.DEFINE_integer("pairs", 6, "Pairs (and groups of 4 answers: pairs / 6).")

ALL_PAIRS = tuple((i, j) for i in range(4) for j in range(i + 1, 4))  # the 6 pairs of 4 answers


def examples(cfg, n: int, rng):
    """(n prompt groups of 4 answers with their positions, the image adapter, one prepared image)."""
    adapter = image_inputs.for_model(cfg, None, max_images=1, patch_buckets=(4 * _IMAGE.value,))
    side = math.isqrt(_IMAGE.value) * adapter.config.factor
    png = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(png, "PNG")
    prepared = adapter.prepare([png.getvalue()])
    groups = []
    for _ in range(n):
        text = list(rng.integers(2, 8000, _PROMPT.value - _IMAGE.value - 1))
        prompt = [1] + [cfg.image_token_id] * _IMAGE.value + text
        answers = [list(rng.integers(2, 8000, _ANSWER.value)) for _ in range(4)]
        groups.append(packing.Group(prompt, answers, ALL_PAIRS, adapter.positions(np.asarray(prompt), prepared)))
    return groups, adapter, prepared


def forward_flops(model, batch, layout: str) -> float:
    graphdef, params = nnx.split(model)
    spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)  # noqa: E731
    traced = jax.jit(lambda p, b: logps.pair_logps(nnx.merge(graphdef, p), b, layout=layout)).trace(
        jax.tree.map(spec, params), jax.tree.map(spec, batch))
    return analysis.matmul_flops(traced.jaxpr)[0]


def main(argv):
    del argv
    cfg = families.from_hf(presets.hf_config(_MODEL.value))
    run = config_lib.RunSettings(param_dtype=jnp.bfloat16, check_image_tokens=False, scan_layers="on")
    model = families.abstract_model(cfg, run)
    rng = np.random.default_rng(0)
    G = max(1, _PAIRS.value // len(ALL_PAIRS))
    groups, adapter, prepared = examples(cfg, G * len(ALL_PAIRS), rng)
    P, A, mrope = _PROMPT.value, _ANSWER.value, bool(cfg.text.mrope_section)
    pairs = [packing.Group(g.prompt, g.answers[:2], positions=g.positions) for g in groups]
    pixels = adapter.collate([prepared] * len(pairs))[0]
    rows = {"concat": (pairs, dict(seq_len=P + A)), "shared_prefix": (pairs, dict(seq_len=P + 2 * A)),
            "multi_answer": (groups[:G], dict(seq_len=P + 4 * A, max_answers=4, max_pairs=len(ALL_PAIRS)))}
    print(f"{_MODEL.value}: prompt {P} tokens ({_IMAGE.value} of them an image), answers {A}; pair log-likelihood "
          f"forward, matmul FLOPs through every loop")
    per_pair = {}
    for layout, (units, kw) in rows.items():
        images = {k: v[:len(units)] for k, v in pixels.items()}
        batch, _ = packing.pack(units, layout=layout, max_answer_len=A, mrope=mrope, images=images, **kw)
        n = len(units) * (len(ALL_PAIRS) if layout == "multi_answer" else 1)
        per_pair[layout] = forward_flops(model, batch, layout) / n
        print(f"  {layout:13s} rows {tuple(batch.input_ids.shape)}: {per_pair[layout] / 1e12:.3f} TFLOP per pair",
              flush=True)
    print("\n| layout | TFLOP per pair | concat / layout |\n|---|---|---|")
    for layout, f in per_pair.items():
        print(f"| {layout} | {f / 1e12:.3f} | {per_pair['concat'] / f:.2f}× |")


if __name__ == "__main__":
    app.run(main)
