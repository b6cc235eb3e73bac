"""Qwen3-VL (transformers' `Qwen3VLForConditionalGeneration`): Qwen2.5-VL's images and positions, a tower
with learned resampled positions and DeepStack, a Qwen3 decoder with interleaved M-RoPE.

  config.py     Qwen3VLConfig, read from a transformers Qwen3VLConfig
  model.py      the composition (DeepStack into the decoder) and its checkpoint names
  vision.py     the vision tower (position table resampled per image, DeepStack mergers)
  tiny.py       tiny configs for tests, smoke and demo

Preprocessing, the image adapter and the 3D positions are `qwen2_5_vl`'s (`images.py`, `inputs.py`,
`positions.py`): the same processor class, with the folder's patch size (16) and pixel budget.
"""

from rdpo_jax.models.qwen2_5_vl import inputs
from rdpo_jax.models.qwen3_vl import config, model, tiny
from rdpo_jax.models.vlm import Family

FAMILY = Family(model_type="qwen3_vl", architecture="Qwen3VLForConditionalGeneration", config=config.Qwen3VLConfig,
                from_hf=config.from_hf, model=model.Qwen3VL, image_input=inputs.image_input,
                hf_read=model.HF_READ, hf_write=model.HF_WRITE, tiny=tiny)
