"""Flax NNX vision-language models and their Hugging Face IO.

  config.py           architecture configs read from a transformers config.json; RunSettings
  layers.py           linear, norms, attention, RoPE, remat policies
  vision.py           SigLIP / CLIP vision towers
  text.py             Llama / Qwen2 / Qwen3 decoder
  llava.py            the composition, image-feature splicing, `create`
  hf.py               `load_hf` / `save_hf`
  safetensors_io.py   memory-mapped reader, streaming sharded writer
  qwen_vision.py      the Qwen2.5-VL vision tower (packed patch buffer, window/full attention masks)
"""
