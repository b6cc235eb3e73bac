"""The Qwen3.5-MoE composition (transformers' `Qwen3_5MoeForConditionalGeneration`): Qwen3.5's, every decoder
MLP a sparse MoE with a shared expert (`models/moe.py`). Checkpoint names are Qwen3.5's; the Hub holds the
experts' stacked weights [E, out, in] (`HF_EXPERTS`, unlike Qwen3-VL-MoE's [E, in, out]), transformers 5.23
saves them one tensor per expert (`models/hf.py` reads both)."""

from rdpo_jax.models.qwen3_5.model import HF_READ, HF_SKIP, HF_WRITE, Qwen35

__all__ = ["HF_EXPERTS", "HF_READ", "HF_SKIP", "HF_WRITE", "Qwen35Moe"]
HF_EXPERTS = "out_in"


class Qwen35Moe(Qwen35):
    """Qwen3.5-MoE: see `Qwen35`; training adds the routers' load-balancing loss (`train_step`)."""
