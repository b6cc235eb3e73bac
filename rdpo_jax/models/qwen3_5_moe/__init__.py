"""Qwen3.5-MoE (transformers' `Qwen3_5MoeForConditionalGeneration`): Qwen3.5 (`models/qwen3_5/`) whose every
decoder MLP is a sparse mixture of experts with a shared expert (`models/moe.py`).

  config.py     Qwen35MoeConfig, read from a transformers Qwen3_5MoeConfig
  model.py      the composition (Qwen3.5's), its checkpoint names and expert layout
  tiny.py       tiny configs for tests, smoke and demo
"""

from rdpo_jax.models.qwen2_5_vl import inputs
from rdpo_jax.models.qwen3_5_moe import config, model, tiny
from rdpo_jax.models.vlm import Family

FAMILY = Family(model_type="qwen3_5_moe", architecture="Qwen3_5MoeForConditionalGeneration",
                config=config.Qwen35MoeConfig, from_hf=config.from_hf, model=model.Qwen35Moe,
                image_input=inputs.image_input, hf_read=model.HF_READ, hf_write=model.HF_WRITE,
                hf_skip=model.HF_SKIP, hf_experts=model.HF_EXPERTS, tiny=tiny)
