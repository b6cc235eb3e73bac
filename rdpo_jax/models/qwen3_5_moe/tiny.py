"""Tiny Qwen3.5-MoE models (random weights, no downloads): Qwen3.5's tiny models with every decoder MLP a MoE
of 4 experts, 2 per token, and a shared expert. What every family's `tiny` provides is listed in
`models/vlm.py` (`Family`)."""

from __future__ import annotations

from rdpo_jax.models.qwen3_5 import tiny as qwen3_5
from rdpo_jax.models.qwen3_5.tiny import (IMAGE_MARKUP, PARITY_TOKENS, PARITY_VISION, VISION_TOKENS, demo_config,
                                          save_processor, smoke_config, smoke_images)

__all__ = ["IMAGE_MARKUP", "VISION_TOKENS", "demo_config", "hf_config", "save_processor", "smoke_config",
           "smoke_images", "PARITY_TOKENS", "PARITY_VISION", "PARITY_TEXT"]
MOE = dict(num_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.001)


def hf_config(tokenizer, *, width: int = 64, depth: int = 2, image_size: int | None = None, patch_size: int = 4,
              tied: bool = False, **text):
    """Qwen3.5's tiny model (`qwen3_5.tiny.hf_config`) with every decoder MLP a MoE of 4 experts of width/2 − 8
    (neither it nor twice it the width: `config.moe_from_hf`), 2 per token, and a shared expert as wide."""
    import transformers

    dense = qwen3_5.hf_config(tokenizer, width=width, depth=depth, image_size=image_size, patch_size=patch_size,
                              tied=tied, **text)
    inter = dense.text_config.hidden_size // 2 - 8
    fields = dense.to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        fields.pop(key, None)
    for sub in ("vision_config", "text_config"):
        fields[sub].pop("model_type", None)
    fields["text_config"].pop("intermediate_size")
    fields["text_config"] |= MOE | dict(moe_intermediate_size=inter, shared_expert_intermediate_size=inter) | text
    return transformers.Qwen3_5MoeConfig(**fields)


# The parity config (../shared/QWEN35.md §7): Qwen3.5's, every MLP 4 experts of width 24, 2 per token, and a
# shared expert of width 24.
PARITY_TEXT = ({k: v for k, v in qwen3_5.PARITY_TEXT.items() if k != "intermediate_size"} | MOE
               | dict(moe_intermediate_size=24, shared_expert_intermediate_size=24))
