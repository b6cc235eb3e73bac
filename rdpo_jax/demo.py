"""`make demo` until the full rDPO demo lands: the model round trip through Hugging Face files.

Builds a tiny SigLIP + Qwen2 LLaVA config with transformers, initializes it sharded on a
`("data", "fsdp", "tensor")` mesh of all local devices, writes it as a Hugging Face folder, loads that
folder back tensor by tensor onto the mesh, runs a jitted forward, and — when PyTorch is installed —
loads the same folder in transformers and compares logits.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from rdpo_jax import sharding
from rdpo_jax.models import config as config_lib
from rdpo_jax.models import hf, llava

_WORKDIR = flags.DEFINE_string("workdir", "demo_workdir", "Where the demo writes its model folders.")
_SEED = flags.DEFINE_integer("seed", 0, "Initialization and input seed.")


def tiny_config():
    import transformers

    return transformers.LlavaConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, image_size=64, patch_size=16),
        text_config=dict(model_type="qwen2", vocab_size=512, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024),
        image_token_index=3, vision_feature_layer=-1, vision_feature_select_strategy="full")


def main(argv):
    del argv
    out = os.path.abspath(_WORKDIR.value)
    n = jax.device_count()
    tensor = 2 if n % 2 == 0 else 1
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": tensor})
    print(f"devices: {n} × {jax.devices()[0].platform}; mesh {dict(mesh.shape)}")

    cfg = config_lib.from_hf(tiny_config())
    model = llava.create(cfg, mesh=mesh, seed=_SEED.value)
    base = os.path.join(out, "base")
    files = hf.save_hf(model, cfg, base)
    print(f"initialized {sum(x.size for x in jax.tree.leaves(nnx.state(model))):,} parameters; wrote {base}: "
          f"{', '.join(files)}")

    t0 = time.perf_counter()
    loaded, cfg = hf.load_hf(base, mesh=mesh)
    print(f"load_hf: {time.perf_counter() - t0:.2f}s")

    rng = np.random.default_rng(_SEED.value)
    batch, length, F = 2 * mesh.shape["fsdp"], 96, cfg.image_seq_len
    ids = rng.integers(4, cfg.text.vocab_size, (batch, length)).astype(np.int32)
    ids[:, 1:1 + F] = cfg.image_token_id
    images = rng.standard_normal((batch, 64, 64, 3)).astype(np.float32)
    forward = nnx.jit(lambda m, i, p: m(i, p))
    with jax.set_mesh(mesh):
        logits = jax.block_until_ready(forward(loaded, jnp.asarray(ids), jnp.asarray(images)))
        t0 = time.perf_counter()
        for _ in range(5):
            logits = jax.block_until_ready(forward(loaded, jnp.asarray(ids), jnp.asarray(images)))
    ms = (time.perf_counter() - t0) / 5 * 1e3
    print(f"forward [{batch}×{length}] logits {logits.shape} {logits.dtype} sharded {logits.sharding.spec}: "
          f"{ms:.1f} ms/step")

    try:
        import torch
        import transformers
    except ImportError:
        print("PyTorch is not installed: skipping the transformers comparison")
        return
    ref = transformers.LlavaForConditionalGeneration.from_pretrained(base, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor(ids, dtype=torch.long),
                       pixel_values=torch.tensor(images.transpose(0, 3, 1, 2))).logits.numpy()
    diff = float(np.abs(np.asarray(logits) - expected).max())
    print(f"transformers LlavaForConditionalGeneration on the same folder: max |Δlogit| = {diff:.2e}")
    if diff > 1e-4:
        raise SystemExit(f"logits differ from transformers by {diff:.2e} (> 1e-4)")
    print("OK: JAX init → HF folder → load_hf → forward matches transformers.")


if __name__ == "__main__":
    app.run(main)
