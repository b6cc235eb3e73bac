"""The LM head over answer tokens, whole vs in vocabulary chunks: compiled memory and time.

    python benchmarks/lm_head.py [--tokens=2048] [--width=3584] [--vocab=152064] [--chunks=0,8192,16384,32768]
        [--dtype=float32] [--time_tokens=256] [--steps=5]

The function compiled is what the DPO step differentiates at the head: log p(target) of `--tokens` answer
tokens (a device's share: 2 pairs × 2 × 512-token answers at the 7B configs' shapes) from their final hidden
states, `sum(logps · g)` and its gradient with respect to the hidden states and the head, in --dtype,
float32 log-likelihoods (`layers.target_logps`; chunk 0 = all [tokens, vocab] logits at once). The default
is float32 because XLA:CPU runs a bfloat16 matmul on float32 copies of its operands: with --dtype=bfloat16
both variants' temporaries grow by the head's float32 copy (2.03 GiB at 3584 × 152064), which a TPU or GPU
does not make.
Memory is XLA's analysis of the compiled program at Qwen2.5-VL-7B's width and vocabulary (compiled, never
run); time is the median of `--steps` calls at `--time_tokens` tokens on this machine, every variant
timed in turn, with the largest difference of the log-likelihoods from the whole head's.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from rdpo_jax.models import layers

_TOKENS = flags.DEFINE_integer("tokens", 2048, "Answer tokens per device (memory).")
_WIDTH = flags.DEFINE_integer("width", 3584, "Hidden width (Qwen2.5-VL-7B: 3584).")
_VOCAB = flags.DEFINE_integer("vocab", 152064, "Vocabulary (Qwen2.5-VL-7B: 152064).")
_CHUNKS = flags.DEFINE_list("chunks", ["0", "8192", "16384", "32768"], "Columns per chunk (0 = whole).")
_TIME_TOKENS = flags.DEFINE_integer("time_tokens", 256, "Answer tokens for the timed calls (0 = no timing).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed calls per variant.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype of hidden states and head.")


def head_grad(chunk: int):
    def loss(x, w, targets, g):
        return (layers.target_logps(x, w, targets, chunk) * g).sum()

    return jax.jit(jax.value_and_grad(loss, (0, 1)))


def inputs(tokens: int, abstract: bool):
    dtype = jnp.dtype(_DTYPE.value)
    shapes = [((tokens, _WIDTH.value), dtype), ((_WIDTH.value, _VOCAB.value), dtype),
              ((tokens,), jnp.int32), ((tokens,), jnp.float32)]
    if abstract:
        return [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
    rng = np.random.default_rng(0)
    return [jnp.asarray(rng.standard_normal((tokens, _WIDTH.value)), dtype),
            jnp.asarray(rng.standard_normal((_WIDTH.value, _VOCAB.value)) * 0.02, dtype),
            jnp.asarray(rng.integers(0, _VOCAB.value, tokens), jnp.int32),
            jnp.asarray(rng.standard_normal(tokens), jnp.float32)]


def main(argv):
    del argv
    chunks = [int(c) for c in _CHUNKS.value]
    print(f"{_TOKENS.value} answer tokens, width {_WIDTH.value}, vocab {_VOCAB.value}, {_DTYPE.value}; "
          f"logits of all tokens in float32 would be {_TOKENS.value * _VOCAB.value * 4 / 2**30:.2f} GiB")
    for chunk in chunks:
        mem = head_grad(chunk).lower(*inputs(_TOKENS.value, True)).compile().memory_analysis()
        print(f"  chunk {chunk or 'whole':>6}: temporaries {mem.temp_size_in_bytes / 2**30:6.2f} GiB, "
              f"arguments {mem.argument_size_in_bytes / 2**30:.2f} GiB, outputs {mem.output_size_in_bytes / 2**30:.2f} GiB")
    if not _TIME_TOKENS.value:
        return
    args = inputs(_TIME_TOKENS.value, False)
    fns = {c: head_grad(c) for c in chunks}
    logps = {c: jax.jit(layers.target_logps, static_argnums=3)(*args[:3], c) for c in chunks}
    for f in fns.values():
        jax.block_until_ready(f(*args))
    times = {c: [] for c in chunks}
    for _ in range(_STEPS.value):
        for c, f in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[c].append(time.perf_counter() - start)
    base = statistics.median(times[chunks[0]])
    print(f"value and gradient at {_TIME_TOKENS.value} tokens, medians of {_STEPS.value} ({jax.devices()[0].platform}):")
    for c in chunks:
        t = statistics.median(times[c])
        diff = float(jnp.abs(logps[c] - logps[chunks[0]]).max())
        print(f"  chunk {c or 'whole':>6}: {t * 1e3:8.1f} ms ({t / base:.2f}× chunk {chunks[0] or 'whole'}), "
              f"max |Δ log p| {diff:.2e}")


if __name__ == "__main__":
    app.run(main)
