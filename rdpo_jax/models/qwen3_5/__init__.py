"""Qwen3.5 (transformers' `Qwen3_5ForConditionalGeneration`): Qwen3-VL's images, tower (without DeepStack) and
3D positions, and a hybrid decoder of Gated DeltaNet and gated attention layers.

  config.py     Qwen35Config and HybridTextConfig, read from a transformers Qwen3_5Config
  text.py       the hybrid decoder (scanned by blocks of its repeating layer pattern)
  model.py      the composition and its checkpoint names
  tiny.py       tiny configs for tests, smoke and demo

The DeltaNet layer and how packed rows run through its recurrent state: `models/deltanet.py`.
"""

from rdpo_jax.models.qwen2_5_vl import inputs
from rdpo_jax.models.qwen3_5 import config, model, tiny
from rdpo_jax.models.vlm import Family

FAMILY = Family(model_type="qwen3_5", architecture="Qwen3_5ForConditionalGeneration", config=config.Qwen35Config,
                from_hf=config.from_hf, model=model.Qwen35, image_input=inputs.image_input,
                hf_read=model.HF_READ, hf_write=model.HF_WRITE, hf_skip=model.HF_SKIP, tiny=tiny)
