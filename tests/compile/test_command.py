"""`python -m rdpo_jax.compile` as users run it: a config that cannot fit its slice exits 1 and says why."""

import json
import shutil
import subprocess
import sys

import pytest

from tests import runs


def test_a_config_that_does_not_fit_exits_1(smoke_dir, tmp_path):
    pytest.importorskip("libtpu")
    # the smoke model with a vocabulary of 2^25: 4.3 B parameters of embedding and head, with Adam and the
    # reference copy ~17 GiB per v5e chip against 16
    shutil.copytree(f"{smoke_dir}/model", tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    config["text_config"]["vocab_size"] = 2**25
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    out = tmp_path / "plan.json"
    cmd = [sys.executable, "-m", "rdpo_jax.compile", f"--config=configs/smoke.py:dir={tmp_path}",
           "--topology=v5litepod-4", "--programs=train", f"--json={out}"]
    env = runs.env("", devices=1)
    proc = subprocess.run(cmd, cwd=runs.ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "v5litepod-4 = v5e:2x2: 4 TPU v5 lite devices" in proc.stdout
    assert "DOES NOT FIT" in proc.stdout and "does not fit v5litepod-4: train (8 rows of 48 tokens)" in proc.stdout
    (train,) = json.loads(out.read_text())["programs"]
    assert not train["fits"] and "exceeds available HBM" in train["error"]
