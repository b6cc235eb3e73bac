"""This machine's matmul peak, the yardstick of the benchmarks' achieved FLOP/s."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def matmul_peak(sizes=(1024, 2048), steps: int = 7) -> float:
    """The best FLOP/s of one fp32 [n, n] @ [n, n] product on the default device over `sizes` (each the
    median of `steps`)."""
    return max(_matmul(n, steps) for n in sizes)


def _matmul(n: int, steps: int) -> float:
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
    f = jax.jit(lambda x: x @ x).lower(a).compile()
    f(a).block_until_ready()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times)
