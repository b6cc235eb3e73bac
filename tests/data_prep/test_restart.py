"""Every data_prep command writes what its input determines, whatever the sharding and however often killed:
for build_rubrics, judge, make_pairs and ref_logps, shard 0 of 2 SIGKILLed at set records (a real SIGKILL:
common.KILL_AT_ENV) and rerun until done, plus shard 1 of 2 uninterrupted, merge to exactly the one-shard
output, record for record; sample is killed and rerun as one shard, and run as two JAX processes with
--num_shards=0. On the way, token ids travel from the sampler into the pairs, and text-only prompts sample
alongside prompts with an image. The one-shard outputs of the chain (pool → samples → judged → pairs) are
made once and shared."""

import json
import os
import signal
import socket
import subprocess
import sys
import types

import numpy as np
import pytest

from data_prep import common
from rdpo_jax import testing
from rdpo_jax.data import arrayrecord
from rdpo_jax.data.tokenize import ChatTokenizer
from rdpo_jax.rubrics import generate
from tests import runs

TEXT_ONLY = ("p2", "p5")
ID = {"rubric_pool": "prompt_id", "samples": "sample_id", "pairs": "pair_id", "groups": "group_id"}


def _pool(folder: str) -> None:
    rng = np.random.default_rng(0)
    colours = ["red", "green", "blue", "yellow"]
    pool = []
    for i in range(7):
        image = testing.png(rng)
        text_only = f"p{i}" in TEXT_ONLY
        # additional criteria only: random answers still differ in reward, so most prompts get pairs
        truth = {"details": [colours[i % 4], "circle"], "absent": [colours[(i + 1) % 4]], "max_words": 6}
        text = "describe the image"
        content = text if text_only else [{"type": "image"}, {"type": "text", "text": text}]
        pool.append(dict(prompt_id=f"p{i}", images=[] if text_only else [image],
                         messages=[{"role": "user", "content": content}], rubric=generate.rule_rubric(truth)))
    arrayrecord.write(folder, "pool", "rubric_pool", pool)


def _name(command: list[str]) -> str:
    return next(a.split("=")[1] for a in command if a.startswith("--name="))


def _complete(command: list[str], out: str, kills: list[int], cache: str, shard: str = "") -> list[dict]:
    """Runs `command` (its dataset: --out/--name) as `shard` ("I/N": --shard_index=I --num_shards=N; default
    one shard), SIGKILLed at the k-th record added of each run in `kills`, then to the end; returns the
    dataset's records in manifest order (all shards' once the last one is done)."""
    name = _name(command)
    command = [sys.executable, "-m", *command, f"--out={out}"]
    if shard:
        index, count = shard.split("/")
        command += [f"--shard_index={index}", f"--num_shards={count}"]
    for k in kills:
        env = dict(runs.env(cache, devices=1), **{common.KILL_AT_ENV: str(k)})
        proc = subprocess.run(command, cwd=runs.ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
        assert not os.path.exists(arrayrecord.manifest_path(out, name))
    log = runs.run(command, runs.env(cache, devices=1)).stdout
    if kills:
        assert "already_done" in log
    if not os.path.exists(arrayrecord.manifest_path(out, name)):
        return []
    return list(arrayrecord.read(os.path.join(out, name)))


def _shards_then_merged(command: list[str], out: str, kills: list[int], cache: str) -> list[dict]:
    """Shard 0 of 2 killed at `kills` and rerun, shard 1 uninterrupted: the merged dataset's records, ordered
    by id (shards are checked non-empty and disjoint)."""
    assert _complete(command, out, kills, cache, shard="0/2") == []  # no dataset manifest before shard 1 is done
    merged = _complete(command, out, [], cache, shard="1/2")
    name, kind = _name(command), arrayrecord.read_manifest(os.path.join(out, _name(command)))["kind"]
    ids = [{r[ID[kind]] for r in arrayrecord.read(os.path.join(out, f"{name}-s{i:05d}-of-00002"))} for i in (0, 1)]
    assert ids[0] and ids[1] and not ids[0] & ids[1], ids
    return _by_id(merged)


def _by_id(rows: list[dict]) -> list[dict]:
    key = next(ID[k] for k in ("samples", "pairs", "groups", "rubric_pool") if ID[k] in rows[0])
    return sorted(rows, key=lambda r: r[key])


@pytest.fixture(scope="module")
def chain(smoke_dir, compile_cache, tmp_path_factory):
    """One-shard, uninterrupted outputs of sample → judge → make_pairs on a pool of 7 prompts (2 text-only),
    with the commands that made them."""
    tmp = tmp_path_factory.mktemp("chain")
    pool, ref, model = str(tmp / "pool"), str(tmp / "ref"), f"{smoke_dir}/model"
    _pool(str(tmp))
    # 4 samples a prompt, chunks of ≥ 5 records: a chunk ending at its 5th record would end inside a
    # prompt. Batches of ≤ 3 per image count: [p2, p5], [p0, p1, p3], [p4, p6].
    sample = ["data_prep.sample", f"--pool={pool}", f"--model={model}", "--n=4", "--max_new_tokens=8",
              "--batch_size=3", "--chunk_size=5", "--name=samples"]
    samples = _complete(sample, ref, [], compile_cache)
    # judged in fixed batches of 4 samples; chunks of one record (committed when the next is added)
    judge = ["data_prep.judge", f"--pool={pool}", "--judge=verifier", "--batch_size=4", "--chunk_size=1",
             "--name=judged", f"--samples={ref}/samples"]
    judged = _complete(judge, ref, [], compile_cache)
    # chunks of ≥ 1 pair (ending at the next prompt)
    make_pairs = ["data_prep.make_pairs", f"--pool={pool}", "--margin=0.05", "--max_pairs=2",
                  "--chunk_size=1", "--name=pairs", f"--judged={ref}/judged"]
    pairs = _complete(make_pairs, ref, [], compile_cache)
    return types.SimpleNamespace(tmp=tmp, model=model, sample=sample, samples=samples, judge=judge, judged=judged,
                                 make_pairs=make_pairs, pairs=pairs)


def test_build_rubrics_sharded_and_killed_writes_the_one_shard_pool(tmp_path, compile_cache):
    build = ["data_prep.build_rubrics", f"--input={runs.prompts_jsonl(tmp_path, n=8)}", "--chunk_size=1",
             "--name=pool"]
    pool = _complete(build, str(tmp_path / "one"), [], compile_cache)
    assert len(pool) == 8
    # shard 0 holds p0, p2, p4, p6: killed at its 3rd record (p0 committed), then at the rerun's 3rd (p2)
    assert _shards_then_merged(build, str(tmp_path / "two"), [3, 3], compile_cache) == _by_id(pool)


def test_sample_killed_and_rerun_writes_what_an_uninterrupted_run_writes(chain, compile_cache):
    """The first kill (record 18: p3's second) leaves the batch [p0, p1, p3] partly done, the second (record 10
    of the rerun: p6's second) [p4, p6]; the reruns generate those batches again whole and must write the same
    samples."""
    samples = chain.samples
    assert len(samples) == 28 and {s["prompt_id"] for s in samples} >= set(TEXT_ONLY)
    assert _complete(chain.sample, str(chain.tmp / "killed"), [18, 10], compile_cache) == samples

    tok = ChatTokenizer(chain.model, image_token_id=testing.IMAGE_TOKEN)
    assert {s["sampler"]["tokenizer"] for s in samples} == {tok.fingerprint}
    for s in samples:  # the text is the ids decoded; a sample that stopped ends with a stop id
        assert s["response"] == tok.tokenizer.decode(s["response_ids"], skip_special_tokens=True).strip()
        assert len(s["response_ids"]) == 8 or s["response_ids"][-1] in tok.stop_ids()
        assert testing.IMAGE_TOKEN not in s["response_ids"]  # never sampled: training would splice an image in


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sample_as_two_jax_processes_with_num_shards_0(chain, compile_cache):
    """--num_shards=0 is one shard per JAX process: two processes joined through a coordinator on 127.0.0.1
    write disjoint shards whose union is the one-process output."""
    out, port = str(chain.tmp / "two_processes"), _free_port()
    command = [sys.executable, "-m", *chain.sample, f"--out={out}", "--num_shards=0",
               f"--distributed_coordinator=127.0.0.1:{port}", "--distributed_num_processes=2"]
    procs = [subprocess.Popen(command + [f"--distributed_process_id={i}"], cwd=runs.ROOT,
                              env=runs.env(compile_cache, devices=1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in (0, 1)]
    logs = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, stderr) in zip(procs, logs):
        assert p.returncode == 0, stdout[-2000:] + stderr[-4000:]
    assert "shard 0/2" in logs[0][0] and "shard 1/2" in logs[1][0]
    ids = [{r["sample_id"] for r in arrayrecord.read(f"{out}/samples-s{i:05d}-of-00002")} for i in (0, 1)]
    assert ids[0] and ids[1] and not ids[0] & ids[1]
    assert _by_id(list(arrayrecord.read(f"{out}/samples"))) == _by_id(chain.samples)


def test_judge_sharded_and_killed_writes_the_one_shard_verdicts(chain, compile_cache):
    """Shard 0 judges batches 0, 2, 4, 6 (samples 0–3, 8–11, …): killed at its 7th record (batch 2 partly
    committed), then at the rerun's 6th (batch 4 partly committed)."""
    judged = chain.judged
    assert [s["response_ids"] for s in judged] == [s["response_ids"] for s in chain.samples]  # the judge keeps them
    assert _shards_then_merged(chain.judge, str(chain.tmp / "judged2"), [7, 6], compile_cache) == _by_id(judged)


def test_make_pairs_sharded_and_killed_writes_the_one_shard_pairs(chain, compile_cache):
    """Shard 0 mines p0, p2, p4, p6: the first kill is before a prompt's second pair, inside its group (an
    Output that committed mid-item had marked it done); the rerun's kill is before its last record, after
    the commits of the items before that one."""
    pairs = chain.pairs
    mine = [p for p in pairs if p["prompt_id"] in ("p0", "p2", "p4", "p6")]
    second = [i + 1 for i in range(1, len(mine)) if mine[i]["prompt_id"] == mine[i - 1]["prompt_id"]]
    assert second, "no prompt of shard 0 with two pairs: choose pool/sampling settings that give more"
    rest = mine[second[0] - 2:]  # the first kill commits the items before the group (chunks of ≥ 1 record)
    assert len({p["prompt_id"] for p in rest}) >= 2 and len(pairs) > len(mine), "too few pairs"
    merged = _shards_then_merged(chain.make_pairs, str(chain.tmp / "pairs2"), [second[0], len(rest)], compile_cache)
    assert merged == _by_id(pairs)
    by_id = {s["sample_id"]: s for s in chain.samples}
    tok = ChatTokenizer(chain.model, image_token_id=testing.IMAGE_TOKEN)
    for p in pairs:
        assert p["chosen_ids"] == by_id[p["meta"]["chosen_sample"]]["response_ids"]
        assert p["rejected_ids"] == by_id[p["meta"]["rejected_sample"]]["response_ids"]
        assert p["tokenizer"] == tok.fingerprint


def test_ref_logps_sharded_and_killed_writes_each_record_its_own_values(smoke_dir, tmp_path, compile_cache):
    """The smoke pairs (8) and a bad one (5 criteria of 4, skipped by `on_bad_record=skip`) after the 5th, in
    batches of 3, two records to a row where they fit (multi_answer rows of 96 tokens): [0, 1 | 2], [3, 4 | bad],
    [5, 6 | 7]; shard 0 scores batches 0 and 2, shard 1 batch 1. Shard 0 killed at its 3rd record (batch 0
    partly committed: record 0, not its row's partner 1) and rerun: every record gets the values an
    uninterrupted one-shard run gives it, to the bit, and the bad record is counted, not silently dropped (one
    kill: each run of this command costs ~10 s)."""
    inputs = list(arrayrecord.read(f"{smoke_dir}/pairs"))
    criteria = [dict(inputs[0]["rubric"]["criteria"][0], id=f"c{j}") for j in range(5)]  # over max_criteria 4
    bad = dict(inputs[0], pair_id="bad", rubric={"criteria": criteria}, chosen_scores=[1] * 5, rejected_scores=[0] * 5)
    arrayrecord.write(str(tmp_path), "pairs", "pairs", inputs[:5] + [bad] + inputs[5:])
    ref_logps = ["data_prep.ref_logps", f"--config=configs/smoke.py:dir={smoke_dir}",
                 "--config.dpo.pair_layout=multi_answer", "--config.data.groups_per_row=2",
                 "--config.data.seq_buckets=(96,)", "--config.data.on_bad_record=skip", f"--pairs={tmp_path}/pairs",
                 "--batch_size=3", "--chunk_size=1", "--name=pairs_ref"]
    one = _complete(ref_logps, str(tmp_path / "one"), [], compile_cache)
    assert [{k: v for k, v in r.items() if not k.startswith("ref_")} for r in one] == inputs
    assert len({r["ref_chosen_logp"] for r in one}) == len(one)  # every record its own value
    summary = json.load(open(tmp_path / "one" / "pairs_ref-s00000-of-00001.summary.json"))
    assert summary["skipped/too_many_criteria"] == 1 and summary["pairs"] == len(inputs)
    assert _shards_then_merged(ref_logps, str(tmp_path / "two"), [3], compile_cache) == _by_id(one)
