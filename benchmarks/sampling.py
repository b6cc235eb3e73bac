"""Generation throughput: rdpo_jax.sampling.generate vs transformers' generate on the same weights.

    python benchmarks/sampling.py [--prompts=8] [--new_tokens=64] [--repeats=3] [--samples=1]

A small LLaVA (SigLIP 64 px / patch 16 = 16 image tokens, 2 layers; Qwen2 decoder 4 layers × 256,
vocab 2048) with random weights, saved once as a Hugging Face folder and loaded by both. Greedy
decoding of --new_tokens tokens (no stop token) for --prompts prompts of 40 tokens, one CPU process;
the median over --repeats runs after one warm-up (which includes our compile). Tokens/s counts
generated tokens. The outputs are checked equal.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from absl import app, flags

from rdpo_jax import sampling
from rdpo_jax.models import config as config_lib
from rdpo_jax.models import families, hf

_PROMPTS = flags.DEFINE_integer("prompts", 8, "Prompts per batch.")
_NEW = flags.DEFINE_integer("new_tokens", 64, "Tokens generated per prompt.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs (median reported).")


def main(argv):
    del argv
    hf_cfg = transformers.LlavaConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=128, intermediate_size=256,
                           num_hidden_layers=2, num_attention_heads=4, image_size=64, patch_size=16),
        text_config=dict(model_type="qwen2", vocab_size=2048, hidden_size=256, intermediate_size=704,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024),
        image_token_index=3, vision_feature_layer=-1, vision_feature_select_strategy="full")
    cfg = families.from_hf(hf_cfg)
    folder = os.path.join(tempfile.mkdtemp(), "model")
    hf.save_hf(families.create(cfg, seed=0), folder, hf_cfg)
    model, cfg = hf.load_hf(folder)
    torch_model = transformers.LlavaForConditionalGeneration.from_pretrained(folder).eval()

    rng = np.random.default_rng(0)
    prompts = [[1] + [3] * cfg.image_seq_len + list(rng.integers(4, 2048, 23)) for _ in range(_PROMPTS.value)]
    ids, mask = sampling.left_pad(prompts, 0)
    pixels = rng.standard_normal((_PROMPTS.value, 64, 64, 3)).astype(np.float32)
    sc = sampling.SamplingConfig(max_new_tokens=_NEW.value, temperature=0.0)

    def ours():
        tokens, _ = sampling.generate(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels),
                                      jax.random.key(0), sc)
        return np.asarray(jax.block_until_ready(tokens))

    def theirs():
        with torch.no_grad():
            out = torch_model.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                                       attention_mask=torch.tensor(mask, dtype=torch.long),
                                       pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)),
                                       max_new_tokens=_NEW.value, do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[:, ids.shape[1]:].numpy()

    results = {}
    for name, fn in (("rdpo_jax", ours), ("transformers", theirs)):
        t0 = time.perf_counter()
        first = fn()
        warm = time.perf_counter() - t0
        times = []
        for _ in range(_REPEATS.value):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        results[name] = (first, statistics.median(times), warm)
    n = _PROMPTS.value * _NEW.value
    assert np.array_equal(results["rdpo_jax"][0], results["transformers"][0]), "outputs differ"
    for name, (_, t, warm) in results.items():
        print(f"{name:13s} {n / t:8.1f} tokens/s (median {t:.3f}s for {n} tokens; first run {warm:.2f}s)")
    print(f"ratio rdpo_jax / transformers: {results['transformers'][1] / results['rdpo_jax'][1]:.1f}× "
          f"({jax.devices()[0].platform}, torch {torch.__version__} CPU, greedy, identical tokens)")


if __name__ == "__main__":
    app.run(main)
