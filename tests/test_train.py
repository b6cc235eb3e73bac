"""The real command, `python -m rdpo_jax.train`, in subprocesses: smoke runs, resume after SIGKILL and
SIGTERM (bitwise), multi-process equivalence, and the non-finite guard."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from rdpo_jax import checkpoint, optim, sharding, train_step
from rdpo_jax.models import hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(tmp_cache, devices=8):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=tmp_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               PYTHONPATH=ROOT)
    return env


def _command(smoke_dir, workdir, *overrides, objective="dpo"):
    return [sys.executable, "-m", "rdpo_jax.train", f"--config=configs/smoke.py:dir={smoke_dir},objective={objective}",
            f"--workdir={workdir}", *overrides]


def _run(cmd, env, timeout=300):
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _final_params(workdir, smoke_dir):
    cfg = hf.read_config(f"{smoke_dir}/model")
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    abstract = train_step.abstract_state(cfg, optim.make_optimizer(learning_rate=0.0), mesh)[1].params
    params, step = checkpoint.restore_params(workdir, abstract)
    return jax.tree.map(np.asarray, params), step


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax_cache"))


def test_dpo_smoke_loss_goes_down(smoke_dir, tmp_path, cache):
    workdir = str(tmp_path / "run")
    proc = _run(_command(smoke_dir, workdir, "--config.total_steps=40", "--config.checkpoint.every=20",
                         "--config.log.every=1"), _env(cache))
    assert "compiled the dpo step" in proc.stdout and "temporaries" in proc.stdout
    records = [r for r in _metrics(workdir) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 41))
    losses = [r["loss"] for r in records]
    assert losses[0] == pytest.approx(np.log(2), abs=1e-4)  # policy = reference at step 0
    assert np.mean(losses[-5:]) < 0.5 * losses[0]  # the same 8 pairs every step: the loss must fall
    for key in ("rewards/margins", "rewards/accuracies", "rubric/essential_agreement", "grad_norm", "lr",
                "pairs_per_s", "tokens_per_s", "skipped/corrupt"):
        assert key in records[-1], key
    evals = [r for r in _metrics(workdir) if "eval/loss" in r]
    assert len(evals) == 1 and evals[0]["step"] == 40
    assert json.load(open(os.path.join(workdir, "config.json")))["dpo"]["loss_type"] == "rubric"
    assert os.listdir(os.path.join(workdir, "tensorboard"))


def test_sft_smoke(smoke_dir, tmp_path, cache):
    workdir = str(tmp_path / "sft")
    _run(_command(smoke_dir, workdir, objective="sft"), _env(cache))
    records = [r for r in _metrics(workdir) if "loss" in r]
    assert len(records) == 6 and records[-1]["loss"] < records[0]["loss"]
    _, step = _final_params(workdir, smoke_dir)
    assert step == 6


def _wait_for(predicate, proc, timeout=240):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    raise TimeoutError("the run did not get there in time")


def _steps_done(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    return max((r["step"] for r in _metrics(workdir) if "loss" in r), default=0) if os.path.exists(path) else 0


def test_resume_after_sigkill_and_sigterm_is_bitwise_identical(smoke_dir, tmp_path, cache):
    args = ("--config.total_steps=12", "--config.checkpoint.every=3", "--config.log.every=1",
            "--config.data.eval=", "--config.checkpoint.async_save=True")
    env = _env(cache)
    straight = str(tmp_path / "straight")
    _run(_command(smoke_dir, straight, *args), env)

    resumed = str(tmp_path / "resumed")
    ckpts = os.path.join(resumed, "checkpoints")
    proc = subprocess.Popen(_command(smoke_dir, resumed, *args), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: os.path.isdir(os.path.join(ckpts, "3")) and _steps_done(resumed) >= 4, proc)
    proc.send_signal(signal.SIGKILL)  # no chance to save: resume from the last complete checkpoint
    proc.wait()
    assert checkpoint.Checkpointer(ckpts, every=3, keep=2).latest_step() in (3, 6)

    proc = subprocess.Popen(_command(smoke_dir, resumed, *args), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: _steps_done(resumed) >= 8, proc)
    proc.send_signal(signal.SIGTERM)  # a preempted VM: save the current step, exit cleanly
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    saved = checkpoint.Checkpointer(ckpts, every=3, keep=2).latest_step()
    assert "SIGTERM: saved step" in err + out and saved == _steps_done(resumed) and saved >= 8

    _run(_command(smoke_dir, resumed, *args), env)
    a, step_a = _final_params(straight, smoke_dir)
    b, step_b = _final_params(resumed, smoke_dir)
    assert step_a == step_b == 12
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    # the data order continued where it stopped: the same loss at every step, to the bit
    loss = lambda w: {r["step"]: r["loss"] for r in _metrics(w) if "loss" in r}  # noqa: E731
    assert loss(resumed) == loss(straight)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(smoke_dir, tmp_path, cache):
    args = ("--config.total_steps=3", "--config.data.eval=", "--config.mesh.data=1", "--config.mesh.fsdp=2",
            "--config.mesh.tensor=2", "--config.optim.learning_rate=1e-2")
    single = str(tmp_path / "single")
    _run(_command(smoke_dir, single, *args), _env(cache, devices=4))
    multi = str(tmp_path / "multi")
    port = _free_port()
    procs = [subprocess.Popen(_command(smoke_dir, multi, *args, f"--config.distributed.coordinator=127.0.0.1:{port}",
                                       "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"),
                              cwd=ROOT, env=_env(cache, devices=2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-4000:]
    a, _ = _final_params(single, smoke_dir)
    b, step = _final_params(multi, smoke_dir)
    assert step == 3
    # fp32 sums in another order (gloo all-reduces), amplified by Adam's division on near-zero gradients:
    # allow 1e-5 on parameters that 3 steps at lr 1e-2 move by up to 3e-2
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-5)
    ls = [r["loss"] for r in _metrics(single) if "loss" in r]
    lm = [r["loss"] for r in _metrics(multi) if "loss" in r]
    np.testing.assert_allclose(ls, lm, rtol=1e-5)


def test_nonfinite_streak_stops_the_run(smoke_dir, tmp_path, cache):
    workdir = str(tmp_path / "nan")
    # a learning rate of 1e30 makes the first update blow the weights up; every later loss is non-finite
    proc = subprocess.run(_command(smoke_dir, workdir, "--config.optim.learning_rate=1e30",
                                   "--config.optim.grad_clip=0", "--config.optim.max_nonfinite=2",
                                   "--config.total_steps=10", "--config.optim.warmup_steps=0",
                                   "--config.optim.schedule=constant"),
                          cwd=ROOT, env=_env(cache), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "2 consecutive steps with a non-finite loss or gradients" in proc.stderr
    assert "pairs-0000" in proc.stderr  # the batch's records are named
