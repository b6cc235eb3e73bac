"""`python -m rdpo_jax.demo --budget=tiny --rounds=2 --family=qwen2_5_vl`: the whole loop through the real
commands on a tiny budget, with the Qwen2.5-VL policy — every stage's output exists and is well-formed,
the table has every arm and round, a re-run reuses every stage. (`make demo`'s default family, LLaVA, runs
the same commands; its world's model is checked on its own.)"""

import glob
import json
import os
import sys

from rdpo_jax.data import arrayrecord, records
from rdpo_jax.demo import world
from rdpo_jax.configs.loop_demo import ARMS
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
    # round 1: the SFT policy's samples → verdicts, shared by the arms; each arm's loop mines its own pairs
    judged = _dataset(f"{wd}/seed0/round1/judged", "samples")
    assert all(s["judge"] == "verifier" and "scores" in s for s in judged)
    assert {s["sampler"]["model"] for s in judged} == {f"{wd}/sft"}
    for arm, (miner, loss) in ARMS.items():
        loop = f"{wd}/seed0/{arm}"
        r1 = json.load(open(f"{loop}/round_001/manifest.json"))
        assert r1["status"] == "done" and r1["stages"]["sample"]["status"] == "skipped"
        assert r1["stages"]["pairs"]["inputs"]["judged"] == f"{wd}/seed0/round1/judged"
        assert all(p["meta"]["miner"] == miner for p in arrayrecord.read(f"{loop}/round_001/pairs"))
        run = json.load(open(f"{loop}/round_001/run/config.json"))
        assert run["init_from"] == f"{wd}/sft" and run["dpo"]["loss_type"] == loss
        assert os.listdir(f"{loop}/round_001/run/checkpoints")
        # round 2: the arm samples its own round-1 policy and trains on from it (or keeps it, with no pairs)
        r2 = json.load(open(f"{loop}/round_002/manifest.json"))
        assert r2["policy_before"] == f"{loop}/round_001/run"
        samples = _dataset(f"{loop}/round_002/judged", "samples")
        assert {s["sampler"]["model"] for s in samples} == {f"{loop}/round_001/run"}
        if json.load(open(f"{loop}/round_002/pairs.manifest.json"))["count"]:
            assert json.load(open(f"{loop}/round_002/run/config.json"))["init_from"] == f"{loop}/round_001/run"
        else:
            assert r2["policy_after"] == f"{loop}/round_001/run" and r2["stages"]["train"]["status"] == "skipped"
    # evaluations of the base and of every arm after each round
    for ev in ["eval/base"] + [f"seed0/{arm}/round_{r:03d}/eval" for arm in ARMS for r in (1, 2)]:
        metrics = json.load(open(f"{wd}/{ev}/metrics.json"))
        assert metrics["prompts"] == 12 and set(metrics["groups"]) <= set(world.KINDS)
        assert "essential_pass" in metrics and "rubric_score" in metrics
    table = open(f"{wd}/results.md").read()
    for row in ["base (SFT)", *ARMS, *(f"{arm} round 2" for arm in ARMS)]:
        assert f"| {row} |" in table
    assert "| rubric+rubric |" in first.stdout  # the table is printed at the end
    page = open(f"{wd}/report.html").read()
    assert page.count("data:image/png;base64") >= 7  # curves and example scenes
    assert "outcome+sigmoid" in page and "<li class=" in page  # per-criterion verdicts

    # a re-run reuses every stage (world, rubrics, sft, round 1's samples, the base's evaluation); each
    # arm's loop finds its rounds done and runs nothing; the same table is printed
    again = runs.run(cmd, env, timeout=300)
    assert again.stdout.count("done before") == 5 and "[demo] evaluate: done before" in again.stdout
    loop_logs = sorted(glob.glob(f"{wd}/logs/*-rdpo_jax.loop.log"), key=lambda p: int(os.path.basename(p).split("-")[0]))
    for log in loop_logs[-len(ARMS):]:
        assert " … (log" not in open(log).read(), log

    def rows(text):
        return [line for line in text.splitlines() if line.startswith("|")]
    assert len(rows(table)) == 2 + 1 + 2 * len(ARMS) and rows(again.stdout) == rows(table)


def test_llava_world_model(tmp_path):
    """The default family's world model: a LLaVA folder whose image gives 4 tokens, one per grid cell."""
    from rdpo_jax.models import hf

    world.write_model(str(tmp_path))
    _, cfg = hf.load_hf(str(tmp_path))
    assert cfg.image_seq_len == 4 and "processor_config.json" in os.listdir(tmp_path)
