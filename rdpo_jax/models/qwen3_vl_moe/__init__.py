"""Qwen3-VL-MoE (transformers' `Qwen3VLMoeForConditionalGeneration`): Qwen3-VL (`models/qwen3_vl/`) whose
decoder MLPs are sparse mixtures of experts (`models/moe.py`) where the config says.

  config.py     Qwen3VLMoeConfig, read from a transformers Qwen3VLMoeConfig
  model.py      the composition (Qwen3-VL's) and its checkpoint names
  tiny.py       tiny configs for tests, smoke and demo
"""

from rdpo_jax.models.qwen2_5_vl import inputs
from rdpo_jax.models.qwen3_vl_moe import config, model, tiny
from rdpo_jax.models.vlm import Family

FAMILY = Family(model_type="qwen3_vl_moe", architecture="Qwen3VLMoeForConditionalGeneration",
                config=config.Qwen3VLMoeConfig, from_hf=config.from_hf, model=model.Qwen3VLMoe,
                image_input=inputs.image_input, hf_read=model.HF_READ, hf_write=model.HF_WRITE, tiny=tiny)
