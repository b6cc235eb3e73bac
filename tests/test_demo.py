"""`python -m rdpo_jax.demo --budget=tiny --rounds=2 --family=qwen2_5_vl`: the whole loop through the real
commands on a tiny budget, with the Qwen2.5-VL policy — every stage's output exists and is well-formed,
the table has every arm and round, a re-run reuses every stage. (`make demo`'s default family, LLaVA, runs
the same commands; its world's model is checked on its own.)"""

import json
import os
import sys

from rdpo_jax.data import arrayrecord, records
from rdpo_jax.demo import world
from rdpo_jax.demo.__main__ import ARMS
from tests import runs


def _dataset(path, kind):
    items = list(arrayrecord.read(path))
    assert items, path
    for i, r in enumerate(items):
        records.validate(r, kind, f"{path}[{i}]")
    return items


def test_tiny_demo_runs_every_stage_and_reuses_them(tmp_path, compile_cache):
    wd = str(tmp_path / "demo")
    env = runs.env(compile_cache)
    cmd = [sys.executable, "-m", "rdpo_jax.demo", f"--workdir={wd}", "--budget=tiny", "--rounds=2",
           "--family=qwen2_5_vl"]
    first = runs.run(cmd, env, timeout=600)

    # world: an HF model folder with the trained tokenizer, SFT data with imperfect answers, prompt files
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= set(
        os.listdir(f"{wd}/world/model"))
    assert json.load(open(f"{wd}/world/model/config.json"))["model_type"] == "qwen2_5_vl"
    stats = json.load(open(f"{wd}/world/world.json"))["sft"]
    assert len(_dataset(f"{wd}/world/sft", "sft")) == stats["examples"] and 0 < stats["imperfect"] < stats["examples"]
    # rubric pools from the rule generator: instance-specific, machine-checkable
    for name in ("train_pool", "heldout_pool"):
        pool = _dataset(f"{wd}/rubrics/{name}", "rubric_pool")
        assert all(all("check" in c for c in p["rubric"]["criteria"]) for p in pool)
    describe = [p for p in pool if p["prompt_id"].startswith("describe")]
    assert any(c["id"].startswith("absent:") for c in describe[0]["rubric"]["criteria"])
    # the round: samples → verdicts → pairs of both miners
    judged = _dataset(f"{wd}/seed0/round1/judged", "samples")
    assert all(s["judge"] == "verifier" and "scores" in s for s in judged)
    for miner in ("rubric", "outcome"):
        pairs = list(arrayrecord.read(f"{wd}/seed0/round1/pairs_{miner}"))
        assert all(p["meta"]["miner"] == miner for p in pairs)
    # training runs and evaluations of base and every arm
    for run in ["sft"] + [f"seed0/{arm}" for arm in ARMS]:
        assert os.listdir(f"{wd}/{run}/checkpoints"), run
    for ev in ["base"] + [f"seed0/{arm}" for arm in ARMS]:
        metrics = json.load(open(f"{wd}/eval/{ev}/metrics.json"))
        assert metrics["prompts"] == 12 and set(metrics["groups"]) <= set(world.KINDS)
        assert "essential_pass" in metrics and "rubric_score" in metrics
    table = open(f"{wd}/results.md").read()
    for row in ["base (SFT)", *ARMS]:
        assert f"| {row} |" in table
    assert "| rubric+rubric |" in first.stdout  # the table is printed at the end
    page = open(f"{wd}/report.html").read()
    assert page.count("data:image/png;base64") >= 7  # curves and example scenes
    assert "outcome+sigmoid" in page and "<li class=" in page  # per-criterion verdicts

    # round 2: each arm samples its own policy, mines with its own miner and trains on from its round-1 run
    for arm, (miner, _) in ARMS.items():
        samples = _dataset(f"{wd}/seed0/{arm}-round2/judged", "samples")
        assert {s["sampler"]["model"] for s in samples} == {f"{wd}/seed0/{arm}"}  # the arm's own policy
        assert os.path.exists(f"{wd}/seed0/{arm}-round2/pairs_{miner}.manifest.json")
        assert not os.path.exists(f"{wd}/seed0/{arm}-round2/pairs_{'outcome' if miner == 'rubric' else 'rubric'}")
        mined = json.load(open(f"{wd}/seed0/{arm}-round2/pairs_{miner}.manifest.json"))["count"]
        if mined:
            assert json.load(open(f"{wd}/seed0/{arm}-round2/run/config.json"))["init_from"] == f"{wd}/seed0/{arm}"
        else:  # no pairs to learn from: the arm's policy stays its round-1 run
            assert os.path.realpath(f"{wd}/seed0/{arm}-round2/run") == os.path.realpath(f"{wd}/seed0/{arm}")
        assert json.load(open(f"{wd}/eval/seed0/{arm}-round2/metrics.json"))["prompts"] == 12
        assert f"| {arm} round 2 |" in table

    # a re-run reuses every stage (world, rubrics, sft, round 1, then per arm: train, round 2, train 2) and
    # every evaluation, and prints the same table
    again = runs.run(cmd, env, timeout=300)
    assert again.stdout.count("done before") == 4 + 3 * len(ARMS) + 1
    assert "[demo] evaluate: done before" in again.stdout

    def rows(text):
        return [line for line in text.splitlines() if line.startswith("|")]
    assert len(rows(table)) == 2 + 1 + 2 * len(ARMS) and rows(again.stdout) == rows(table)


def test_llava_world_model(tmp_path):
    """The default family's world model: a LLaVA folder whose image gives 4 tokens, one per grid cell."""
    from rdpo_jax.models import hf

    world.write_model(str(tmp_path))
    _, cfg = hf.load_hf(str(tmp_path))
    assert cfg.image_seq_len == 4 and "processor_config.json" in os.listdir(tmp_path)
