"""Every process runs the same program on the same data: 2 processes × 2 devices (gloo collectives) against
1 process × 4 devices, on data that spans several global batches and two epochs, two length buckets that
the processes' rows disagree on, records skipped by reason, an eval set of odd size; and preemption —
SIGTERM to one process, then to both — saving one step everywhere and resuming bitwise, also on a
slice of another size."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from data_prep import smoke
from rdpo_jax import checkpoint, testing
from rdpo_jax.data import arrayrecord, pipeline
from rdpo_jax.data.tokenize import ChatTokenizer
from rdpo_jax.models import hf, image_inputs
from tests import runs

STEPS = 12  # 40 records, batches of 8: two and a half epochs
BUCKETS = (36, 48)  # a pair with the short answers needs 33 tokens, one with a long chosen answer 41


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """40 training pairs, every third with a 12-word chosen answer, two with a prompt too long for any
    bucket (skipped and counted); 9 held-out pairs (two global batches, the second nearly empty)."""
    out = str(tmp_path_factory.mktemp("multihost"))
    rng = np.random.default_rng(7)
    train = []
    for i in range(40):
        p = smoke.pair(rng, i)
        if i % 3 == 0:
            p["chosen"] = smoke._words(rng, 12)
        if i in (5, 26):
            p["messages"][0]["content"][1]["text"] = smoke._words(rng, 30)
        train.append(p)
    arrayrecord.write(out, "pairs", "pairs", train, num_shards=3)
    arrayrecord.write(out, "pairs_eval", "pairs", [smoke.pair(rng, 100 + i) for i in range(9)])
    return out


def _args(smoke_dir, data, workdir, *extra):
    return runs.train_args(
        smoke_dir, workdir, f"--config.total_steps={STEPS}", f"--config.data.train={data}/pairs",
        f"--config.data.eval={data}/pairs_eval", f"--config.data.seq_buckets={BUCKETS}",
        "--config.data.max_answer_len=16", "--config.data.on_bad_record=skip", "--config.eval.batches=4",
        "--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.mesh.tensor=2", "--config.optim.learning_rate=1e-2",
        # fp32 sums in another order (gloo all-reduces): Adam's ε = 1e-3 keeps near-zero gradients from
        # amplifying that rounding into whole updates (ε = 1e-8 let one weight in 4096 differ by 1.4e-5)
        "--config.optim.eps=1e-3", "--config.checkpoint.every=100", "--config.log.every=1", *extra)


@pytest.fixture(scope="module")
def one_process(smoke_dir, data, tmp_path_factory, compile_cache):
    workdir = str(tmp_path_factory.mktemp("one") / "run")
    runs.run([sys.executable, "-m", "rdpo_jax.train", *_args(smoke_dir, data, workdir)],
             runs.env(compile_cache, devices=4))
    return workdir


@pytest.fixture(scope="module")
def two_processes(smoke_dir, data, tmp_path_factory, compile_cache):
    """The uninterrupted two-process run, its processes started as the preempted ones below are: every run
    compared bitwise compiles with the same XLA flags (launch/local_multiprocess.sh sets its own; the packed
    rows' pair runs through it)."""
    logs = tmp_path_factory.mktemp("two")
    workdir = str(logs / "run")
    for p in _start(_args(smoke_dir, data, workdir), runs.env(compile_cache, devices=2), logs, "two"):
        assert p.wait(timeout=300) == 0, open(f"{logs}/two-0.log").read()[-3000:]
    return workdir


def _losses(workdir):
    return {r["step"]: r["loss"] for r in runs.metrics(workdir) if "loss" in r}


def test_the_processes_rows_need_different_buckets_in_the_same_step(smoke_dir, data):
    """The data above makes the processes disagree on the bucket in some steps (what the runs below
    must survive), and a 2-process share of each global batch is the 1-process batch's rows."""
    from configs import smoke as smoke_config

    config = smoke_config.get_config(f"dir={smoke_dir}")
    config.data.update(seq_buckets=BUCKETS, max_answer_len=16, on_bad_record="skip")
    options = pipeline.Options.from_config(config)
    tok = ChatTokenizer(f"{smoke_dir}/model", image_token_id=testing.IMAGE_TOKEN)

    def dataset(p, n):
        return pipeline.make_dataset(arrayrecord.Source(f"{data}/pairs"), options, tok,
                                     image_inputs.from_config(config, hf.read_config(f"{smoke_dir}/model")),
                                     global_batch_size=8, seed=0,
                                     process_index=p, process_count=n)

    shares, whole = [dataset(p, 2) for p in (0, 1)], dataset(0, 1)
    lengths = [[shares[p][s]["batch"].input_ids.shape[1] for p in (0, 1)] for s in range(STEPS)]
    assert any(a != b for a, b in lengths), lengths
    for s in range(STEPS):
        agreed = max(lengths[s])
        assert whole[s]["batch"].input_ids.shape[1] == agreed
        parts = [shares[p][s]["batch"] for p in (0, 1)]
        joined = np.concatenate([b.pad(len(b.valid), agreed, b.targets.shape[1]).input_ids for b in parts])
        np.testing.assert_array_equal(joined, whole[s]["batch"].input_ids)


def test_two_processes_match_one(smoke_dir, one_process, two_processes):
    ls, lm = _losses(one_process), _losses(two_processes)
    assert sorted(ls) == sorted(lm) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([lm[s] for s in sorted(lm)], [ls[s] for s in sorted(ls)], rtol=1e-5)
    a, _ = runs.final_params(one_process, smoke_dir)
    b, step = runs.final_params(two_processes, smoke_dir)
    assert step == STEPS
    # parameters that 12 steps at lr 1e-2 move by up to 1e-1 agree within 1e-5
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-5)
    last = [[r for r in runs.metrics(w) if "loss" in r][-1] for w in (one_process, two_processes)]
    evals = [[r for r in runs.metrics(w) if "eval/loss" in r][-1] for w in (one_process, two_processes)]
    # counts (cumulative) are summed over processes, not process 0's times two: 96 records read, two bad in
    # each pass of 40; the odd eval set is evaluated whole on both (no process runs an extra batch)
    for key in ("skipped/prompt_too_long", "truncated_answers", "truncated_tokens"):
        assert last[0][key] == last[1][key], key
    assert last[0]["skipped/prompt_too_long"] in (4, 5, 6)
    assert evals[0]["eval/examples"] == evals[1]["eval/examples"] == 9
    for key, value in evals[0].items():
        if key.startswith("eval/"):
            assert evals[1][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args, env, logs, tag):
    """Both processes of a 2-process run, started directly (the test signals them one by one)."""
    port = _free_port()
    procs = []
    for i in range(2):
        log = open(os.path.join(logs, f"{tag}-{i}.log"), "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "rdpo_jax.train", *args, f"--config.distributed.coordinator=127.0.0.1:{port}",
             "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"],
            cwd=runs.ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def _steps_done(workdir):
    if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
        return 0
    return max((r["step"] for r in runs.metrics(workdir) if "loss" in r), default=0)


def _preempt(procs, workdir, after_step, which, logs, tag):
    """SIGTERM to `which` processes once `after_step` is logged; returns the step both saved."""
    end = time.time() + 300
    while _steps_done(workdir) < after_step:
        assert time.time() < end and all(p.poll() is None for p in procs), open(f"{logs}/{tag}-0.log").read()[-3000:]
        time.sleep(0.05)
    # A tiny step takes a few milliseconds: hold process 0 (and with it, in the next collective, process 1)
    # while the notice goes out, so that the sync point lands inside the run, not after its last step.
    procs[0].send_signal(signal.SIGSTOP)
    for i in which:
        procs[i].send_signal(signal.SIGTERM)
    time.sleep(0.5)
    procs[0].send_signal(signal.SIGCONT)
    for p in procs:
        p.wait(timeout=180)
    outs = [open(os.path.join(logs, f"{tag}-{i}.log")).read() for i in range(2)]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    saved = checkpoint.saved_steps(workdir)[-1]
    for out in outs:  # each process stopped at the same step and says so in its own log
        assert f"SIGTERM: saved step {saved};" in out
    assert saved == _steps_done(workdir) < STEPS
    return saved


def test_preemption_saves_one_step_on_every_process_and_resumes_bitwise(smoke_dir, data, two_processes, tmp_path,
                                                                         compile_cache):
    workdir, env, logs = str(tmp_path / "run"), runs.env(compile_cache, devices=2), str(tmp_path)
    args = _args(smoke_dir, data, workdir, "--config.data.eval=")  # evaluation was checked above
    # a maintenance event on one host: JAX's preemption service tells the other, both save the same step
    first = _preempt(_start(args, env, logs, "a"), workdir, 2, [1], logs, "a")
    # a whole slice preempted
    second = _preempt(_start(args, env, logs, "b"), workdir, first + 2, [0, 1], logs, "b")
    assert second > first
    resized = str(tmp_path / "resized")
    shutil.copytree(workdir, resized)

    for p in _start(args, env, logs, "c"):
        assert p.wait(timeout=300) == 0, open(f"{logs}/c-0.log").read()[-3000:]
    assert "(from the compilation cache)" in open(f"{logs}/c-0.log").read()
    a, _ = runs.final_params(two_processes, smoke_dir)
    b, step = runs.final_params(workdir, smoke_dir)
    assert step == STEPS
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert _losses(workdir) == _losses(two_processes)  # every step's loss, to the bit

    # the same checkpoint resumed by one process with 4 devices: the data order continues (batch = step); its
    # steps are `one_process`'s, from the compilation cache
    runs.run([sys.executable, "-m", "rdpo_jax.train", *_args(smoke_dir, data, resized, "--config.data.eval=")],
             runs.env(compile_cache, devices=4))
    ours, theirs = _losses(resized), _losses(two_processes)
    np.testing.assert_allclose([ours[s] for s in range(second + 1, STEPS + 1)],
                               [theirs[s] for s in range(second + 1, STEPS + 1)], rtol=1e-5)


PACKED = ("--config.dpo.pair_layout=multi_answer", "--config.data.groups_per_row=2", "--config.data.seq_buckets=(80,)",
          "--config.data.eval=", "--config.total_steps=4")


def test_packed_rows_two_processes_match_one(smoke_dir, data, tmp_path, compile_cache):
    """data.groups_per_row = 2: each process packs its 4 records into 2 rows of 80 tokens when they fit
    two by two, else 4; processes that disagree on the row count agree on the larger (empty rows) and the
    run equals one process packing all 8."""
    from configs import smoke as smoke_config

    config = smoke_config.get_config(f"dir={smoke_dir}")
    config.data.update(seq_buckets=(80,), max_answer_len=16, on_bad_record="skip", groups_per_row=2)
    config.dpo.pair_layout = "multi_answer"
    tok = ChatTokenizer(f"{smoke_dir}/model", image_token_id=testing.IMAGE_TOKEN)
    shares = [pipeline.make_dataset(arrayrecord.Source(f"{data}/pairs"), pipeline.Options.from_config(config), tok,
                                    image_inputs.from_config(config, hf.read_config(f"{smoke_dir}/model")),
                                    global_batch_size=8, seed=0, process_index=p, process_count=2) for p in (0, 1)]
    rows = [[shares[p][s]["batch"].input_ids.shape for p in (0, 1)] for s in range(4)]
    assert any(a[0] != b[0] for a, b in rows) and any(a == b == (2, 80) for a, b in rows), rows

    one, two = str(tmp_path / "one"), str(tmp_path / "two")

    def args(workdir):  # the buckets above instead of BUCKETS
        kept = [a for a in _args(smoke_dir, data, workdir) if not a.startswith("--config.data.seq_buckets")]
        return kept + list(PACKED)

    runs.run([sys.executable, "-m", "rdpo_jax.train", *args(one)], runs.env(compile_cache, devices=4))
    proc = runs.run(["bash", "launch/local_multiprocess.sh", "--processes=2", "--devices_per_process=2",
                     f"--python={sys.executable}", f"--log_dir={tmp_path}", "--", *args(two)], runs.env(compile_cache))
    assert "all 2 processes finished" in proc.stdout and "no such job" not in proc.stderr
    ls, lm = _losses(one), _losses(two)
    assert sorted(ls) == sorted(lm) == list(range(1, 5))
    np.testing.assert_allclose([lm[s] for s in range(1, 5)], [ls[s] for s in range(1, 5)], rtol=1e-5)
    paddings = [r["token_padding"] for r in runs.metrics(two) if "token_padding" in r]
    assert len(paddings) == 4 and all(0 < p < 0.6 for p in paddings), paddings
