"""Tiny Qwen3-VL-MoE models (random weights, no downloads): Qwen3-VL's tiny models with 4 experts, 2 per
token, in every decoder layer. What every family's `tiny` provides is listed in `models/vlm.py` (`Family`)."""

from __future__ import annotations

import functools

from rdpo_jax.models.qwen2_5_vl import tiny as qwen2_5_vl
from rdpo_jax.models.qwen3_vl import tiny as qwen3_vl
from rdpo_jax.models.qwen3_vl.tiny import (IMAGE_MARKUP, PARITY_TOKENS, PARITY_VISION, VISION_TOKENS, demo_config,
                                           smoke_config, smoke_images)

__all__ = ["IMAGE_MARKUP", "VISION_TOKENS", "demo_config", "hf_config", "save_processor", "smoke_config",
           "smoke_images", "PARITY_TOKENS", "PARITY_VISION", "PARITY_TEXT"]
save_processor = functools.partial(qwen2_5_vl.save_processor, processor_class="Qwen3VLProcessor")
MOE = dict(num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, router_aux_loss_coef=0.001)


def hf_config(tokenizer, *, width: int = 64, depth: int = 2, image_size: int | None = None, patch_size: int = 4,
              tied: bool = False, **text):
    """Qwen3-VL's tiny model (`qwen3_vl.tiny.hf_config`) with every decoder MLP a MoE of 4 experts of
    width/2, 2 per token."""
    import transformers

    dense = qwen3_vl.hf_config(tokenizer, width=width, depth=depth, image_size=image_size, patch_size=patch_size,
                               tied=tied, **text)
    width = dense.text_config.hidden_size
    fields = dense.to_dict()
    fields["text_config"] |= MOE | dict(moe_intermediate_size=width // 2 - 8, mlp_only_layers=[]) | text
    for key in ("model_type", "architectures", "transformers_version"):
        fields.pop(key, None)
    fields["vision_config"].pop("model_type", None)
    fields["text_config"].pop("model_type", None)
    return transformers.Qwen3VLMoeConfig(**fields)


# The parity config: Qwen3-VL's, with 4 experts of width 24, 2 per token, in decoder layers 1 and 2 (layer 0
# dense: mlp_only_layers), so both kinds of MLP run.
PARITY_TEXT = qwen3_vl.PARITY_TEXT | MOE | dict(moe_intermediate_size=24, mlp_only_layers=[0])
