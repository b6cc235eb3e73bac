"""Flax NNX vision-language models and their Hugging Face IO: the shared layers, the family registry,
and a folder per family.

  families.py         the registry: which family a config.json is, `from_hf`, `create`, `abstract_model`
  vlm.py              what every family's model shares (feature splicing, LM head) and `Family`, what a
                      family folder provides
  config.py           the shared architecture configs (text decoder, SigLIP/CLIP tower); RunSettings
  layers.py           linear, norms, attention, RoPE / M-RoPE, remat policies, layer scan
  text.py             Llama / Qwen2 / Qwen3 decoder (dense or with sparse MoE layers)
  moe.py              sparse mixture-of-experts blocks: router, grouped-matmul dispatch, expert parallelism
  lora.py             LoRA adapters on any `ADAPTABLE` weight, the adapters-off switch, merge; QLoRA's
                      quantized base through quant.py (int8 / NF4 codes); peft_io.py: adapters as a PEFT folder
  vision.py           SigLIP / CLIP vision towers
  splash.py           the TPU splash-attention kernel with a layout's mask
  hf.py               `load_hf` / `save_hf`
  safetensors_io.py   memory-mapped reader, streaming sharded writer
  llava/              LLaVA: config, model, image inputs, tiny configs
  qwen2_5_vl/         Qwen2.5-VL: config, model, vision tower, image preprocessing, 3D positions, image
                      inputs, tiny configs
  qwen3_vl/           Qwen3-VL: config, model (DeepStack), vision tower (resampled positions), tiny configs
  qwen3_vl_moe/       Qwen3-VL-MoE: Qwen3-VL with sparse decoder MLPs
"""
