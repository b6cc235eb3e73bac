"""`python -m rdpo_jax.loop` on the smoke setup (real commands in subprocesses): two rounds end to end with
precomputed reference log-likelihoods against the initial policy (the trainer checks them against its
initial policy, and refuses another record's); a rerun, from another directory too, redoes nothing; a
changed config is refused naming the fields; `--rounds` raised continues a finished loop; SIGKILLs during
round 2's sampling and training, each followed by a rerun from another directory, end in the same table as
the uninterrupted loop. The config's paths are relative (to the repository, where the loop first runs)."""

import glob
import itertools
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys

import pytest

from rdpo_jax import checkpoint
from rdpo_jax.data import arrayrecord
from rdpo_jax.loop import rounds
from rdpo_jax.models import hf
from tests import runs

ROUND_STAGES = ["sample", "judge", "pairs", "ref_logps", "train", "evaluate"]
MODULES = {"sample": "data_prep.sample", "judge": "data_prep.judge", "pairs": "data_prep.make_pairs",
           "ref_logps": "data_prep.ref_logps", "train": "rdpo_jax.train", "evaluate": "rdpo_jax.evaluate"}


def _loop(workdir, smoke_dir, *extra):
    """The loop command (runnable from any directory) with the smoke files' folder typed relative to the
    repository: the config's paths are relative."""
    return [sys.executable, "-m", "rdpo_jax.loop",
            f"--config={runs.ROOT}/configs/loop_smoke.py:dir={os.path.relpath(smoke_dir, runs.ROOT)},"
            "reference=initial,ref_logps=1", f"--workdir={workdir}", *extra]


def _run_in(cwd, cmd, env, timeout=600):
    """`cmd` run from the directory `cwd` (not the repository's)."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _manifest(workdir, r):
    with open(os.path.join(workdir, f"round_{r:03d}", "manifest.json")) as f:
        return json.load(f)


def _table(text):
    return [line for line in text.splitlines() if line.startswith("|")]


def _scalars(folder):
    """(tag, step, value) of every scalar in the TensorBoard event files of `folder`."""
    from tensorboardX.proto import event_pb2

    out = []
    for path in glob.glob(os.path.join(folder, "events.out.tfevents.*")):
        data = open(path, "rb").read()
        i = 0
        while i < len(data):  # TFRecord framing: length, its CRC, the event, its CRC
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return out


@pytest.fixture(scope="module")
def loops(smoke_dir, compile_cache, tmp_path_factory):
    """Loop A: round 1, then (the workdir copied as loop B) `--rounds=2`. Returns the folders, A's stdout."""
    root = tmp_path_factory.mktemp("loop")
    a, b = str(root / "a"), str(root / "b")
    env = runs.env(compile_cache)
    first = runs.run(_loop(a, smoke_dir, "--rounds=1"), env, timeout=600)
    shutil.copytree(a, b, symlinks=True)
    second = runs.run(_loop(a, smoke_dir, "--rounds=2"), env, timeout=600)
    return a, b, env, first.stdout, second.stdout


def test_two_rounds_end_to_end(loops, smoke_dir, tmp_path):
    a, _, env, first, second = loops
    assert "| 1 | trained 4 steps |" in first and "| 2 |" not in first
    # round 0: the pools built from the prompt files, the initial policy evaluated
    m0 = _manifest(a, 0)
    assert {k: s["status"] for k, s in m0["stages"].items()} == {
        "rubrics_train": "done", "rubrics_heldout": "done", "evaluate": "done"}
    assert len(list(arrayrecord.read(m0["pools"]["train"]))) == 8
    for r in (1, 2):
        m = _manifest(a, r)
        assert m["status"] == "done" and list(m["stages"]) == ROUND_STAGES
        for name, st in m["stages"].items():
            assert st["status"] == "done" and st["attempts"] == 1, (r, name)
            assert st["module"] == MODULES[name] and os.path.exists(st["log"])
            assert set(st["input_fingerprints"]) == set(st["inputs"]) and set(st["output_fingerprints"]) == set(st["outputs"])
            assert "missing" not in st["input_fingerprints"].values()
        # each round samples the policy the previous one trained, and trains on from it
        policy = m0["policy_after"] if r == 1 else _manifest(a, 1)["policy_after"]
        assert m["policy_before"] == policy and m["policy_after"] == f"{a}/round_{r:03d}/run"
        samples = list(arrayrecord.read(f"{a}/round_{r:03d}/samples"))
        assert len(samples) == 32 and {s["sampler"]["model"] for s in samples} == {policy}
        run_config = json.load(open(f"{a}/round_{r:03d}/run/config.json"))
        assert run_config["init_from"] == policy and run_config["dpo"]["reference"] == "precomputed"
        # round 1 trains from the reference itself: its first step checked the precomputed values
        checked = "the precomputed reference log-likelihoods are the initial policy's"
        assert (checked in open(m["stages"]["train"]["log"]).read()) == (r == 1)
        # the reference is the initial policy in both rounds: round 2's pairs carry its log-likelihoods
        ref = {p["ref_fingerprint"] for p in arrayrecord.read(f"{a}/round_{r:03d}/pairs_ref")}
        assert ref == {hf.fingerprint(f"{smoke_dir}/model")}
        assert run_config["dpo"]["reference_from"] == ("" if r == 1 else f"{smoke_dir}/model")
    # the round-1 stages were not run again when --rounds was raised
    assert "round 1 sample" not in second and "round 2 sample" in second
    # the table: printed, summary.md, report.html; round-level TensorBoard scalars
    table = _table(second)
    assert len(table) == 2 + 3 and table[1 + 1].startswith("| 0 | initial | – | – |")
    assert _table(open(f"{a}/summary.md").read())[:5] == table
    page = open(f"{a}/report.html").read()
    assert "<table>" in page and page.count("data:image/png;base64") == 2 and "round_002/logs/train.log" in page
    metrics = json.load(open(f"{a}/round_002/eval/metrics.json"))
    scalars = _scalars(f"{a}/tensorboard")
    assert sorted(s for t, s, _ in scalars if t == "eval/rubric_score") == [0, 1, 2]
    assert [v for t, s, v in scalars if t == "eval/rubric_score" and s == 2] == [pytest.approx(metrics["rubric_score"])]
    assert {s for t, s, _ in scalars if t == "pairs"} == {1, 2}

    # a rerun, from another directory, does nothing and prints the same table
    assert json.load(open(f"{a}/loop_config.json"))["config"]["policy"] == f"{smoke_dir}/model"  # stored absolute
    again = _run_in(tmp_path, _loop(a, smoke_dir, "--rounds=2"), env)
    assert " … (log" not in again.stdout and _table(again.stdout) == table
    # a changed config is refused, naming the fields; --allow_config_change accepts it (nothing left to run)
    changed = _loop(a, smoke_dir, "--rounds=2", "--config.sample.n=2", "--config.pairs.margin=0.2")
    proc = subprocess.run(changed, cwd=runs.ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 1 and "sample.n: 4 → 2" in proc.stderr and "pairs.margin: 0.05 → 0.2" in proc.stderr
    assert "round" not in proc.stdout  # nothing ran
    runs.run(changed + ["--allow_config_change"], env)
    assert json.load(open(f"{a}/loop_config.json"))["changes"][0]["fields"]["sample.n"] == [4, 2]


def test_killed_during_round_two_resumes_to_the_same_table(loops, smoke_dir, tmp_path):
    a, b, env, _, second = loops
    for hook, stage in (("2/sample:" + "RDPO_TEST_KILL_AT_RECORD=10", "sample"),
                        ("2/train:" + "RDPO_TEST_KILL_AT_STEP=3", "train")):
        proc = subprocess.run(_loop(b, smoke_dir, "--rounds=2"), cwd=runs.ROOT, env=dict(env, **{rounds.KILL_ENV: hook}),
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-3000:]
        # the machine went down: the stage is recorded as running, its partial output is on disk
        assert _manifest(b, 2)["stages"][stage]["status"] == "running"
        if stage == "sample":  # two prompts' samples were committed before the kill, and kept
            assert len(glob.glob(f"{b}/round_002/samples-*.keys.json")) == 1
        else:  # killed after step 3 (checkpoints every 2 steps): step 2's checkpoint is the latest
            assert checkpoint.saved_steps(f"{b}/round_002/run")[-1:] == [2]
    # resumed from another directory: the recorded inputs and commands resolve as in the first call
    other = tmp_path / "elsewhere"
    other.mkdir()
    done = _run_in(other, _loop(b, smoke_dir, "--rounds=2"), env)
    m = _manifest(b, 2)
    assert {k: s["attempts"] for k, s in m["stages"].items()} == {
        "sample": 2, "judge": 1, "pairs": 1, "ref_logps": 1, "train": 2, "evaluate": 1}
    assert "train, attempt 2" in done.stdout and "round 2 sample" not in done.stdout  # finished stages not redone
    assert _table(done.stdout) == _table(second)
    train_log = open(m["stages"]["train"]["log"]).read()
    assert "state from checkpoint 2" in train_log


def test_trainer_refuses_reference_values_of_another_record(loops, smoke_dir, tmp_path, compile_cache):
    """Round 1's pairs with their (correct) reference log-likelihoods, two records' values swapped and
    everything else as written (fingerprint, settings stamp): the trainer (in the test process, `runs.call`),
    whose reference is its initial policy, compares the first batch with its own log-likelihoods and stops,
    naming the pair and both values."""
    a, _, _, _, _ = loops
    pairs = list(arrayrecord.read(f"{a}/round_001/pairs_ref"))[:8]  # one batch of the smoke config
    i, j = max(itertools.combinations(range(len(pairs)), 2),
               key=lambda ij: abs(pairs[ij[0]]["ref_chosen_logp"] - pairs[ij[1]]["ref_chosen_logp"]))
    values = {p["pair_id"]: p["ref_chosen_logp"] for p in pairs}
    assert abs(values[pairs[i]["pair_id"]] - values[pairs[j]["pair_id"]]) > 0.5  # beyond 0.25 + 0.02 n, n ≤ 8
    pairs[i]["ref_chosen_logp"], pairs[j]["ref_chosen_logp"] = pairs[j]["ref_chosen_logp"], pairs[i]["ref_chosen_logp"]
    arrayrecord.write(str(tmp_path), "swapped", "pairs", pairs)
    train = runs.train_args(smoke_dir, str(tmp_path / "run"), f"--config.data.train={tmp_path}/swapped",
                            "--config.dpo.reference=precomputed", "--config.data.eval=", "--config.total_steps=4")
    with pytest.raises(SystemExit) as stopped:  # the step the loop's training compiled, from the cache
        runs.call("rdpo_jax.train", *train, compile_cache=compile_cache)
    found = re.search(r"stopping at step 1: pair '(.+?)' \(.*swapped.*\) carries reference log-likelihoods that are "
                      r"not this run's initial policy's, which is its reference: chosen (\S+) \(the policy: (\S+), "
                      r"\d+ tokens\)", str(stopped.value))
    assert found, str(stopped.value)
    named, written, policy = found[1], float(found[2]), float(found[3])
    assert named in (pairs[i]["pair_id"], pairs[j]["pair_id"])
    other = pairs[j]["pair_id"] if named == pairs[i]["pair_id"] else pairs[i]["pair_id"]
    assert written == pytest.approx(values[other], abs=1e-3) and policy == pytest.approx(values[named], abs=1e-3)
    assert not checkpoint.saved_steps(str(tmp_path / "run"))  # nothing trained on them was written
