"""`python -m rdpo_jax.compile` as users run it: a config that cannot fit its slice exits 1 and says why."""

import json
import subprocess
import sys

import pytest

from tests import runs


def test_a_config_that_does_not_fit_exits_1(smoke_dir, tmp_path):
    pytest.importorskip("libtpu")
    out = tmp_path / "plan.json"
    # 16 rows of 8192 tokens per v5e chip with einsum attention: float32 logits of ~17 GiB against 16 GiB
    cmd = [sys.executable, "-m", "rdpo_jax.compile", f"--config=rdpo_jax/configs/smoke.py:dir={smoke_dir}",
           "--topology=v5litepod-4", "--programs=train", "--config.data.seq_buckets=(8192,)",
           "--config.data.batch_size=64", "--config.model.attention=xla", f"--json={out}"]
    env = dict(runs.env("", devices=1), XLA_FLAGS="--xla_backend_optimization_level=0")
    proc = subprocess.run(cmd, cwd=runs.ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "v5litepod-4 = v5e:2x2: 4 TPU v5 lite devices" in proc.stdout
    assert "DOES NOT FIT" in proc.stdout and "does not fit v5litepod-4: train (64 rows of 8192 tokens)" in proc.stdout
    (train,) = json.loads(out.read_text())["programs"]
    assert not train["fits"] and "exceeds available HBM" in train["error"]
