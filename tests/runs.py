"""Running the real commands (`python -m rdpo_jax.train`, launch scripts) in subprocesses from tests."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env(compile_cache: str, devices: int = 8) -> dict:
    """The test environment for a child process: CPU, `devices` simulated devices, a shared compile cache.
    LLVM optimisation stays on here (unlike in the test process, conftest.py): with it off, two processes
    resumed from a preemption were not bitwise equal to an uninterrupted pair (1e-7 apart). A child that
    crashes (a segfault was seen once in a trainer) prints every thread's Python stack (faulthandler) at the
    end of its stderr, which `run` shows."""
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                JAX_PLATFORMS="cpu", PYTHONFAULTHANDLER="1",
                JAX_COMPILATION_CACHE_DIR=compile_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                PYTHONPATH=ROOT)


def train_args(smoke_dir: str, workdir: str, *overrides: str, objective: str = "dpo") -> list[str]:
    return [f"--config=configs/smoke.py:dir={smoke_dir},objective={objective}", f"--workdir={workdir}", *overrides]


def train_command(smoke_dir: str, workdir: str, *overrides: str, objective: str = "dpo") -> list[str]:
    return [sys.executable, "-m", "rdpo_jax.train", *train_args(smoke_dir, workdir, *overrides, objective=objective)]


def run(cmd: list[str], environment: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def final_params(workdir: str, smoke_dir: str) -> tuple[dict, int]:
    """A smoke run's latest parameters as numpy arrays (in the run's layer layout), and their step."""
    import jax
    import numpy as np
    from flax import nnx

    from rdpo_jax import checkpoint

    model, _, folder, step = checkpoint.load_model(workdir)
    assert os.path.samefile(folder, os.path.join(smoke_dir, "model")), folder
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return jax.tree.map(np.asarray, params), step


def prompts_jsonl(folder, n: int = 6) -> str:
    """`build_rubrics` input: n prompts describing random 24×24 images, with ground truth for the verifier."""
    from data_prep import smoke

    return smoke.write_prompts(str(folder), "prompts", n=n, seed=0)
