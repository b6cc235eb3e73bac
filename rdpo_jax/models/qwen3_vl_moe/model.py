"""The Qwen3-VL-MoE composition (transformers' `Qwen3VLMoeForConditionalGeneration`): Qwen3-VL's, with
the decoder's sparse layers built from `TextConfig.moe` (`models/moe.py`); the same checkpoint names, the
experts' stacked weights read in the Hub's and transformers 5's layouts (`models/hf.py`)."""

from rdpo_jax.models.qwen3_vl.model import HF_READ, HF_WRITE, Qwen3VL

__all__ = ["HF_READ", "HF_WRITE", "Qwen3VLMoe"]


class Qwen3VLMoe(Qwen3VL):
    """Qwen3-VL-MoE: see `Qwen3VL`; training adds the routers' load-balancing loss (`train_step`)."""
