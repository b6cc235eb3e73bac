"""Qwen2.5-VL (transformers' `Qwen2_5_VLForConditionalGeneration`): any-resolution images as patch buffers,
a windowed vision tower, a Qwen2 decoder with M-RoPE.

  config.py     QwenVLConfig, read from a transformers Qwen2_5_VLConfig
  model.py      the composition and its checkpoint names
  vision.py     the vision tower (packed patch buffer, window / full attention masks)
  images.py     preprocessing equal to Qwen2VLImageProcessor: smart_resize, patches, per-patch metadata
  positions.py  3D M-RoPE positions of a prompt (`rope_index`)
  inputs.py     the image adapter (patch buffers, 3D positions)
  tiny.py       tiny configs for tests, smoke and demo
"""

from rdpo_jax.models.qwen2_5_vl import config, inputs, model, tiny
from rdpo_jax.models.vlm import Family

FAMILY = Family(model_type="qwen2_5_vl", architecture="Qwen2_5_VLForConditionalGeneration", config=config.QwenVLConfig,
                from_hf=config.from_hf, model=model.QwenVL, image_input=inputs.image_input,
                hf_read=model.HF_READ, hf_write=model.HF_WRITE, tiny=tiny)
