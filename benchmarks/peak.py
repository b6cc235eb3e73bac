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


# the decoder's products in `benchmarks/vs_trl.py`'s concat step (24 rows of 832 tokens, width 256, MLP 512,
# 4 query / 2 KV heads of 64): q/o projections, k/v, MLP up and down, and one query block's scores
STEP_SHAPES = ((19968, 256, 256), (19968, 256, 128), (19968, 256, 512), (19968, 512, 256), (96 * 128, 64, 832))


def _rate(fn, flops: float, steps: int) -> float:
    fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return flops / statistics.median(times)


def main() -> None:
    """`python benchmarks/peak.py`: XLA's and (if installed) PyTorch's fp32 matmul rates on this machine, for
    square products and for the step's own shapes [m, k] @ [k, n], side by side."""
    rng = np.random.default_rng(0)
    try:
        import torch

        torch.set_num_threads(2)
    except ImportError:
        torch = None
    print(f"{'m × k × n':>20s}  {'XLA GFLOP/s':>12s}  {'PyTorch GFLOP/s':>16s}")
    for m, k, n in ((1024, 1024, 1024), (2048, 2048, 2048)) + STEP_SHAPES:
        a, b = (rng.standard_normal(s, np.float32) for s in ((m, k), (k, n)))
        xa, xb = jnp.asarray(a), jnp.asarray(b)
        f = jax.jit(lambda x, y: x @ y).lower(xa, xb).compile()
        xla = _rate(lambda: f(xa, xb).block_until_ready(), 2 * m * k * n, 7)
        pt = ""
        if torch is not None:
            ta, tb = torch.from_numpy(a), torch.from_numpy(b)
            pt = f"{_rate(lambda: ta @ tb, 2 * m * k * n, 7) / 1e9:16.1f}"
        print(f"{f'{m} × {k} × {n}':>20s}  {xla / 1e9:12.1f}  {pt}")


if __name__ == "__main__":
    main()
