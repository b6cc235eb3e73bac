"""The Qwen3.5 composition (transformers' `Qwen3_5ForConditionalGeneration`): Qwen3-VL's (the tower's merged
patch features spliced over the `<|image_pad|>` placeholders, 3D positions), with a tower without DeepStack
and the hybrid decoder of `text.py`. Checkpoint names are Qwen3-VL's; the Hub's multi-token-prediction
layer (`mtp.*`) is not read."""

from __future__ import annotations

from rdpo_jax.models.qwen3_5.text import HybridDecoder
from rdpo_jax.models.qwen3_vl.model import HF_READ, HF_WRITE, Qwen3VL

__all__ = ["HF_READ", "HF_SKIP", "HF_WRITE", "Qwen35"]
HF_SKIP = r"^mtp\."


class Qwen35(Qwen3VL):
    """Qwen3.5: see `Qwen3VL` (no DeepStack levels) and `HybridDecoder`."""

    decoder = HybridDecoder
