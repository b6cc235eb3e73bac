"""LLaVA (transformers' `LlavaForConditionalGeneration`): a SigLIP or CLIP tower, an MLP projector, a Llama /
Qwen2 / Qwen3 decoder; every image resized to one size.

  config.py   LlavaConfig, read from a transformers LlavaConfig
  model.py    the composition and its checkpoint names
  inputs.py   the image adapter (one size per image)
  tiny.py     tiny configs for tests, smoke and demo
"""

from rdpo_jax.models.llava import config, inputs, model, tiny
from rdpo_jax.models.vlm import Family

FAMILY = Family(model_type="llava", architecture="LlavaForConditionalGeneration", config=config.LlavaConfig,
                from_hf=config.from_hf, model=model.Llava, image_input=inputs.image_input,
                hf_read=model.HF_READ, hf_write=model.HF_WRITE, tiny=tiny)
