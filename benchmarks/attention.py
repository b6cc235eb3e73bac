"""Causal decoder attention, forward + backward: one dense [T, T] product against query blocks
(`layers.attention(..., causal=True)`, blocks of `layers.QUERY_BLOCK`), and this CPU's matmul peak.

    python benchmarks/attention.py [--rows=24] [--length=770] [--heads=4] [--kv_heads=2] [--head_dim=64]
        [--steps=9] [--blocks=64,128,256]

Defaults are the decoder rows of benchmarks/vs_trl.py's concat layout (12 pairs = 24 rows of ≈770
tokens, Qwen2 heads 4 / 2 KV of 64), fp32. Every variant is compiled ahead of time (XLA's FLOP count and
temp memory printed), warmed up, then timed in interleaved rounds; medians. Outputs and gradients of the
blocked variants are checked against the dense one.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from rdpo_jax.models import layers
from peak import matmul_peak  # benchmarks/peak.py

_ROWS = flags.DEFINE_integer("rows", 24, "Sequences per call.")
_LENGTH = flags.DEFINE_integer("length", 770, "Tokens per sequence.")
_HEADS = flags.DEFINE_integer("heads", 4, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 2, "Key/value heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Head dimension.")
_STEPS = flags.DEFINE_integer("steps", 9, "Timed rounds (median reported).")
_BLOCKS = flags.DEFINE_list("blocks", ["64", "128", "256"], "Query block sizes to time.")


def main(_):
    B, T, N, K, H = _ROWS.value, _LENGTH.value, _HEADS.value, _KV_HEADS.value, _HEAD_DIM.value
    rng = np.random.default_rng(0)
    q, k, v, w = (jnp.asarray(rng.standard_normal(s, np.float32)) for s in
                  ((B, T, N, H), (B, T, K, H), (B, T, K, H), (B, T, N, H)))
    lengths = rng.integers(T // 2, T + 1, B)  # right padding
    mask = jnp.asarray(np.tril(np.ones((T, T), bool))[None] & (np.arange(T)[None, None] < lengths[:, None, None]))
    valid = jnp.asarray(np.arange(T)[None, :, None, None] < lengths[:, None, None, None])

    def loss(q, k, v, causal):
        return jnp.sum(jnp.where(valid, w * layers.attention(q, k, v, mask, H ** -0.5, "xla", causal=causal), 0))

    variants = {"dense": None, **{f"blocks of {b}": int(b) for b in _BLOCKS.value}}
    compiled, results = {}, {}
    for name, block in variants.items():
        layers.QUERY_BLOCK = block or T
        fn = jax.jit(jax.value_and_grad(lambda q, k, v, c=block is not None: loss(q, k, v, c), (0, 1, 2)))
        compiled[name] = fn.lower(q, k, v).compile()
        results[name] = jax.block_until_ready(compiled[name](q, k, v))
    for name in variants:
        if name != "dense":
            for x, y in zip(jax.tree.leaves(results[name]), jax.tree.leaves(results["dense"])):
                np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-4)
    times = {name: [] for name in variants}
    for _ in range(_STEPS.value):
        for name, f in compiled.items():
            t = time.perf_counter()
            jax.block_until_ready(f(q, k, v))
            times[name].append(time.perf_counter() - t)
    peak = matmul_peak()
    print(f"{B} rows × {T} tokens, {N} heads / {K} KV of {H}, fp32, forward + backward; "
          f"matmul peak {peak / 1e9:.0f} GFLOP/s ({jax.devices()[0].device_kind})")
    base = statistics.median(times["dense"])
    for name, f in compiled.items():
        flops = f.cost_analysis().get("flops", float("nan"))
        temp = f.memory_analysis().temp_size_in_bytes
        t = statistics.median(times[name])
        print(f"  {name:14s} {t * 1e3:8.1f} ms  ({base / t:4.2f}× dense)  XLA {flops / 1e9:6.2f} GFLOP "
              f"= {flops / t / 1e9:5.0f} GFLOP/s ({flops / t / peak:4.0%} of peak)  temps {temp / 2 ** 20:6.0f} MiB")


if __name__ == "__main__":
    app.run(main)
