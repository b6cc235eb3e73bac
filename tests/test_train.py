"""The real command, `python -m rdpo_jax.train`: resume after SIGKILL and SIGTERM (bitwise) in subprocesses;
the DPO smoke run, the uninterrupted run resumes are compared with, the non-finite guard and the refusal of
empty data in the test process (`runs.call`: what the command computes and says, not its process);
multi-process runs: test_multihost.py."""

import json
import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from rdpo_jax import checkpoint
from rdpo_jax.train import compile_cache_dir
from tests import runs

def test_dpo_smoke_loss_goes_down(smoke_dir, tmp_path, compile_cache):
    workdir = str(tmp_path / "run")
    out = runs.call("rdpo_jax.train", *runs.train_args(smoke_dir, workdir, "--config.total_steps=40",
                                                       "--config.checkpoint.every=20", "--config.log.every=1",
                                                       "--config.log.profile_steps=(3, 4)"),
                    compile_cache=compile_cache)
    assert "compiled the dpo step" in out and "temporaries" in out
    # what was sharded: every parameter in parameters.txt; the smoke vocabulary (51) does not split over tensor=2
    table = open(os.path.join(workdir, "parameters.txt")).read()
    assert "language_model.embed_tokens.embedding" in table and "P('fsdp'" in table
    assert "not sharded: language_model.embed_tokens.embedding dim 0: vocab → tensor=2, size 51" in out
    traces = [f for _, _, files in os.walk(os.path.join(workdir, "profile")) for f in files]
    assert any(f.endswith(".xplane.pb") for f in traces), traces
    records = [r for r in runs.metrics(workdir) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 41))
    losses = [r["loss"] for r in records]
    assert losses[0] == pytest.approx(np.log(2), abs=1e-4)  # policy = reference at step 0
    assert np.mean(losses[-5:]) < 0.5 * losses[0]  # the same 8 pairs every step: the loss must fall
    for key in ("rewards/margins", "rewards/accuracies", "rubric/essential_agreement", "grad_norm", "lr",
                "pairs_per_s", "tokens_per_s", "skipped/corrupt"):
        assert key in records[-1], key
    evals = [r for r in runs.metrics(workdir) if "eval/loss" in r]
    assert len(evals) == 1 and evals[0]["step"] == 40
    assert json.load(open(os.path.join(workdir, "config.json")))["dpo"]["loss_type"] == "rubric"
    assert os.listdir(os.path.join(workdir, "tensorboard"))


def test_sft_smoke(smoke_dir, sft_run):
    workdir, out = sft_run
    records = [r for r in runs.metrics(workdir) if "loss" in r]
    assert len(records) == 6 and records[-1]["loss"] < records[0]["loss"]
    assert "compiled the sft step for 4 rows of 80 tokens" in out  # 8 examples, two per row
    _, step = runs.final_params(workdir, smoke_dir)
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
    return max((r["step"] for r in runs.metrics(workdir) if "loss" in r), default=0) if os.path.exists(path) else 0


def test_resume_after_sigkill_and_sigterm_is_bitwise_identical(smoke_dir, tmp_path, compile_cache):
    args = ("--config.total_steps=12", "--config.checkpoint.every=3", "--config.log.every=1",
            "--config.data.eval=", "--config.checkpoint.async_save=True")
    env = runs.env(compile_cache)
    straight = str(tmp_path / "straight")  # the uninterrupted run in this process; the children load its step
    runs.call("rdpo_jax.train", *runs.train_args(smoke_dir, straight, *args), compile_cache=compile_cache)

    resumed = str(tmp_path / "resumed")
    ckpts = os.path.join(resumed, "checkpoints")
    proc = subprocess.Popen(runs.train_command(smoke_dir, resumed, *args), cwd=runs.ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: os.path.isdir(os.path.join(ckpts, "3")) and _steps_done(resumed) >= 4, proc)
    proc.send_signal(signal.SIGKILL)  # no chance to save: resume from the last complete checkpoint
    proc.wait()
    assert checkpoint.Checkpointer(ckpts, every=3, keep=2).latest_step() in (3, 6)

    proc = subprocess.Popen(runs.train_command(smoke_dir, resumed, *args), cwd=runs.ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: _steps_done(resumed) >= 8, proc)
    proc.send_signal(signal.SIGTERM)  # a preempted VM: save the current step, exit cleanly
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    saved = checkpoint.Checkpointer(ckpts, every=3, keep=2).latest_step()
    assert "SIGTERM: saved step" in err + out and saved == _steps_done(resumed) and saved >= 8
    assert "(from the compilation cache)" in err + out  # a resumed run does not compile its step again

    # the rest of the run in this process: what it computes, not its process, is compared
    runs.call("rdpo_jax.train", *runs.train_args(smoke_dir, resumed, *args), compile_cache=compile_cache)
    a, step_a = runs.final_params(straight, smoke_dir)
    b, step_b = runs.final_params(resumed, smoke_dir)
    assert step_a == step_b == 12
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    # the data order continued where it stopped: the same loss at every step, to the bit
    loss = lambda w: {r["step"]: r["loss"] for r in runs.metrics(w) if "loss" in r}  # noqa: E731
    assert loss(resumed) == loss(straight)


def test_nonfinite_streak_stops_the_run(smoke_dir, tmp_path, compile_cache):
    workdir = str(tmp_path / "nan")
    # a learning rate of 1e30 makes the first update blow the weights up; every later loss is non-finite
    with pytest.raises(SystemExit, match="2 consecutive steps with a non-finite loss or gradients") as stopped:
        runs.call("rdpo_jax.train", *runs.train_args(smoke_dir, workdir, "--config.optim.learning_rate=1e30",
                                                     "--config.optim.grad_clip=0", "--config.optim.max_nonfinite=2",
                                                     "--config.total_steps=10", "--config.optim.warmup_steps=0",
                                                     "--config.optim.schedule=constant"),
                  compile_cache=compile_cache)
    assert "pairs-0000" in str(stopped.value)  # the batch's records are named


def test_compile_cache_folder(tmp_path):
    workdir = str(tmp_path / "run")
    assert compile_cache_dir("workdir", workdir, {}) == os.path.join(workdir, "compile_cache")
    assert compile_cache_dir("/cache", workdir, {}) == "/cache"
    assert compile_cache_dir("", workdir, {}) is None
    assert compile_cache_dir("workdir", workdir, {"JAX_COMPILATION_CACHE_DIR": "/env"}) == "/env"


def test_empty_training_data_is_refused_by_name(smoke_dir, tmp_path):
    from rdpo_jax import config_checks
    from rdpo_jax.data import arrayrecord

    arrayrecord.write(str(tmp_path), "empty", "pairs", [])
    with pytest.raises(config_checks.ConfigError) as refused:
        runs.call("rdpo_jax.train", *runs.train_args(smoke_dir, str(tmp_path / "run"),
                                                     f"--config.data.train={tmp_path}/empty"))
    assert f"config.data.train: {tmp_path}/empty holds no records: nothing to train on" in str(refused.value)


def test_resuming_with_the_other_layer_layout_is_refused(smoke_dir, sft_run):
    """sft_run's checkpoints hold stacked (scanned) layers; resuming it per layer would not restore. The
    trainer checks this before it writes anything into the workdir."""
    from rdpo_jax import config_checks, sharding, train
    from configs import smoke

    workdir, _ = sft_run
    config = smoke.get_config(f"dir={smoke_dir},objective=sft")
    mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 2})
    config.model.scan_layers = "on"
    train._check_layer_layout(workdir, train.Setup(config, mesh))  # the same layout: fine
    config.model.scan_layers = "off"
    with pytest.raises(config_checks.ConfigError, match=r"config.model.scan_layers: 'off', but the checkpoints in "
                       r".* resume with --config.model.scan_layers=on"):
        train._check_layer_layout(workdir, train.Setup(config, mesh))


def test_reference_check_names_the_pair_of_its_slot(tmp_path):
    """The reference check's pair slot (flat, over the batch's `valid`) back to the record and pair it
    holds, for one pair per record, groups of P pairs, and rows packing k groups (slots k·P per row)."""
    from types import SimpleNamespace

    from rdpo_jax import train
    from rdpo_jax.data import arrayrecord
    from tests.data.test_records import examples

    for kind in ("pairs", "groups"):
        arrayrecord.write(str(tmp_path), kind, kind, [examples(i)[kind] for i in range(8)])
    pairs, groups = (arrayrecord.Source(str(tmp_path / kind)) for kind in ("pairs", "groups"))

    def name(slot, index, valid_shape, source):
        return train._pair_name(slot, {"index": np.asarray(index)}, SimpleNamespace(valid=np.zeros(valid_shape)),
                                source)

    assert name(2, [4, 6, 1, -1], (4, 1), pairs) == f"pair 'pair1' ({pairs.where(1)})"
    assert name(3, [4, 6, 1, -1], (4, 2), groups) == f"pair 'pair6b' ({groups.where(6)})"  # record 1, pair 1
    # rows of two groups of two pairs; a third row added empty to agree with another process's row count
    assert name(6, [[3, 5], [7, 2]], (3, 4), groups) == f"pair 'pair2a' ({groups.where(2)})"  # row 1, group 1, pair 0
    assert name(1, [[3, 5], [7, 2]], (3, 4), groups) == f"pair 'pair3b' ({groups.where(3)})"
