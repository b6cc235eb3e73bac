"""`python -m rdpo_jax.demo --budget=tiny --family=qwen2_5_vl`: the whole method through the real commands
on a tiny budget, with the Qwen2.5-VL policy — every stage's output exists and is well-formed, the table
has every arm, a re-run reuses every stage. (Later rounds are the loop's own, tests/test_loop.py.) (`make demo`'s default family, LLaVA, runs
the same commands; its world's model is checked on its own.)"""

import glob
import json
import os
import re
import subprocess
import sys

from rdpo_jax.data import arrayrecord, records
from rdpo_jax.demo import world
from rdpo_jax.demo import ARMS
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
    cmd = [sys.executable, "-m", "rdpo_jax.demo", f"--workdir={wd}", "--budget=tiny",
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
        pairs = list(arrayrecord.read(f"{loop}/round_001/pairs"))
        assert all(p["meta"]["miner"] == miner for p in pairs)
        if pairs:
            run = json.load(open(f"{loop}/round_001/run/config.json"))
            assert run["init_from"] == f"{wd}/sft" and run["dpo"]["loss_type"] == loss
            assert os.listdir(f"{loop}/round_001/run/checkpoints")
        else:  # a 4-step SFT policy rarely passes every essential criterion: the round keeps the SFT policy
            assert r1["stages"]["train"] == {"status": "skipped", "note": "the miner found no pairs"}
            assert not os.path.exists(f"{loop}/round_001/run")
            assert json.load(open(f"{loop}/round_001/eval/metrics.json"))["model"] == f"{wd}/sft"
    # evaluations of the base and of every arm
    for ev in ["eval/base"] + [f"seed0/{arm}/round_001/eval" for arm in ARMS]:
        metrics = json.load(open(f"{wd}/{ev}/metrics.json"))
        assert metrics["prompts"] == 12 and set(metrics["groups"]) <= set(world.KINDS)
        assert "essential_pass" in metrics and "rubric_score" in metrics
    table = open(f"{wd}/results.md").read()
    for row in ["base (SFT)", *ARMS]:
        assert f"| {row} |" in table
    for arm in ARMS:  # the pairs column counts the arm's round-1 pairs
        count = json.load(open(f"{wd}/seed0/{arm}/round_001/pairs.manifest.json"))["count"]
        assert f"| {arm} | {count} |" in table
    assert "| rubric+rubric |" in first.stdout  # the table is printed at the end
    # the paper's comparisons (one seed: no spread to read them against) and the miners' disagreement
    assert "| essential pass | rubric+rubric − outcome+sigmoid |" in table and "one seed: no spread" in table
    assert "| sampled: hallucination | rubric+rubric − outcome+sigmoid |" in table  # the sampled answers' too
    assert json.load(open(f"{wd}/eval/base/metrics.json"))["sampled"]["answers"] == 12 * 2
    differ = re.search(r"seed 0: (\d+)/(\d+) = ", table)  # a 4-step policy may give neither miner a pair
    assert differ and 0 <= int(differ[1]) <= int(differ[2])
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
    assert len(rows(table.split("\n\n")[0])) == 2 + 1 + len(ARMS) and rows(again.stdout) == rows(table)

    # another budget on this workdir is refused, naming every setting that differs (its stages would otherwise
    # be reused): the full budget with this world's SFT steps
    other = subprocess.run(cmd + ["--budget=full", "--sft_steps=4"], cwd=runs.ROOT, env=env, capture_output=True,
                           text=True, timeout=120)
    refused = other.stdout + other.stderr
    assert other.returncode != 0 and "holds a world made with sft_examples=96 (this run: 24000)" in refused
    assert "train_prompts=16 (this run: 512)" in refused and "--fresh" in refused and "sft_steps" not in refused


def test_disagreement_counts_prompts_whose_miners_chose_different_pairs(tmp_path):
    """Round 1's miner disagreement: over the prompts either miner found a pair for, the share where the
    two chose different (chosen, rejected) samples, per kind from the prompt id."""
    from rdpo_jax.demo import report
    from tests.data.test_records import examples

    def pairs(arm, chosen):  # chosen: {prompt id: [(chosen sample, rejected sample), …]}
        rows = [dict(examples()["pairs"], pair_id=f"{q}/{c}/{r}", prompt_id=q,
                     meta={"chosen_sample": c, "rejected_sample": r})
                for q, pairs in chosen.items() for c, r in pairs]
        arrayrecord.write(str(tmp_path / "seed0" / arm / "round_001"), "pairs", "pairs", rows)

    pairs("outcome+sigmoid", {"count-1": [("s0", "s1")], "count-2": [("s0", "s2")], "describe-3": [("s1", "s2")]})
    pairs("rubric+sigmoid", {"count-1": [("s0", "s1")], "count-2": [("s0", "s3")], "colour-4": [("s2", "s3")]})
    text = report.disagreement(str(tmp_path), [0])
    assert "seed 0: 3/4 = 0.75 (colour 1.00, count 0.50, describe 1.00)" in text


def test_comparisons_read_each_metric_against_twice_the_seed_spread():
    """The paper's comparisons of the final rounds, greedy and sampled metrics alike: the difference of
    the seed means against twice the larger std over seeds; lower hallucination is better."""
    from rdpo_jax.demo import report

    def row(name, arm, essential, sampled_hall):
        return {"name": name, "arm": arm, "round": 1,
                "metrics": [{"essential_pass": e, "sampled": {"hallucination": h}} for e, h in zip(essential, sampled_hall)]}

    rows = [row("base (SFT)", None, [0.8], [0.10]),
            row("outcome+sigmoid", "outcome+sigmoid", [0.80, 0.82], [0.09, 0.11]),
            row("rubric+sigmoid", "rubric+sigmoid", [0.81, 0.83], [0.01, 0.03])]
    lines = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in report.comparisons(rows).splitlines()}
    hall = lines[("sampled: hallucination", "rubric+sigmoid − outcome+sigmoid")]
    assert "| -0.080 | 0.020 | rubric+sigmoid better, beyond 2× the spread |" in hall
    assert "| +0.010 | 0.020 | within 2× the spread |" in lines[("essential pass", "rubric+sigmoid − outcome+sigmoid")]
    assert "| -0.080 | 0.020 | rubric+sigmoid better" in lines[("sampled: hallucination", "rubric+sigmoid − base (SFT)")]


def test_llava_world_model(tmp_path):
    """The default family's world model: a LLaVA folder whose image gives 16 tokens, 2×2 patches per grid cell."""
    from rdpo_jax.models import hf

    world.write_model(str(tmp_path))
    _, cfg = hf.load_hf(str(tmp_path))
    assert cfg.image_seq_len == 16 and "processor_config.json" in os.listdir(tmp_path)


def _short_answer(answer):
    """(restated words, [(size, colour, shape, position, tag words, yes/no)], final answer) of a short answer."""
    import re

    restated, _, body = answer.partition(" : ")
    described, final = re.fullmatch(r"(.*) answer : (.*) \.", body).groups()
    phrases = re.findall(r"a (\w+) (\w+) (\w+) at the (\w+ \w+) , ([\w ]+?) (yes|no)(?= and | \.)", described)
    return restated.split(), phrases, final


def _final(kind, phrases):
    """The final answer the yes-tagged objects lead to."""
    yes = [p for p in phrases if p[5] == "yes"]
    return {"presence": "yes" if yes else "no", "count": world.NUMBER_WORDS[len(yes)],
            "colour": yes and yes[0][1], "shape": yes and yes[0][2], "where": yes and yes[0][3]}[kind]


def test_short_answers_tag_the_asked_objects():
    """A short answer restates what the question asks about; after every described object it repeats each
    attribute asked about ("blue yes", "blue same square yes") and tags it yes exactly when it is that
    object; its final answer is what the yes-tagged objects say. The asked object, present or not, is
    never one of the rubric's pitfalls. Imperfect answers keep their final answer on their own tags
    (unless the asked object is missing from their description), some of them with an attribute misread;
    some absent objects asked about have a shape that is there in another colour."""
    import re

    import numpy as np

    from rdpo_jax.rubrics import generate

    rng = np.random.default_rng(1)
    misread = colour_only = 0
    for i in range(700):
        e = world.example(rng, world.KINDS[i % len(world.KINDS)])
        if e["kind"] in world.OPEN_KINDS:
            continue
        asked, phrases, final = _short_answer(e["answer"])
        assert re.search(rf"\b{'.*'.join(a for a in asked if a != 'object')}", e["instruction"]), e
        assert len(phrases) == len(e["objects"])
        for (size, colour, shape, position, words, tag), o in zip(phrases, e["objects"]):
            assert (size, colour, shape, position) == (o["size"], o["colour"], o["shape"], o["position"])
            if len(asked) == 1:  # asked by shape: "square yes"
                assert words == shape and tag == ("yes" if shape == asked[0] else "no"), e["answer"]
            elif asked[1] == "object":  # asked by colour: "blue yes"
                assert words == colour and tag == ("yes" if colour == asked[0] else "no"), e["answer"]
            else:  # "blue same square yes": yes only when both match
                assert words == f"{colour} {'same' if colour == asked[0] else 'other'} {shape}", e["answer"]
                assert tag == ("yes" if (colour, shape) == tuple(asked) else "no"), e["answer"]
        if e["kind"] == "presence" and final == "no":
            colour_only += any(o["shape"] == asked[1] for o in e["objects"])
        assert final == _final(e["kind"], phrases), e["answer"]
        pitfalls = [c["check"]["phrase"] for c in generate.rule_rubric(e["truth"])["criteria"]
                    if c["check"]["type"] == "not_contains"]
        assert " ".join(asked) not in pitfalls, (e["answer"], pitfalls)
        wrong = world.imperfect(e["objects"], e["kind"], e["answer"], e["truth"], rng)
        _, wrong_phrases, wrong_final = _short_answer(wrong)
        if any(p[5] == "yes" for p in wrong_phrases) or e["kind"] in ("presence", "count"):
            assert wrong_final == _final(e["kind"], wrong_phrases), wrong
        if [p[:4] for p in wrong_phrases] == [p[:4] for p in phrases]:  # same objects, tags misread
            misread += wrong_phrases != phrases and wrong_final != final
    assert misread > 20
    assert colour_only > 10  # absent objects whose shape is there in another colour: only the colour tells


def test_world_answers_pass_their_rubrics_and_mistakes_fail_them():
    """Every kind's correct answer passes every criterion of its rule rubric; an imperfect answer that
    differs fails at least one (listing another colour's object fails a pitfall, the count kept)."""
    import numpy as np

    from rdpo_jax.rubrics import generate
    from rdpo_jax.rubrics.verifier import check

    rng = np.random.default_rng(0)
    included = 0
    for i in range(300):
        e = world.example(rng, world.KINDS[i % len(world.KINDS)])
        criteria = generate.rule_rubric(e["truth"])["criteria"]
        assert all(check(c["check"], e["answer"])[0] == 1 for c in criteria), (e["instruction"], e["answer"])
        wrong = world.imperfect(e["objects"], e["kind"], e["answer"], e["truth"], rng)
        failed = [c["id"] for c in criteria if check(c["check"], wrong)[0] == 0]
        assert wrong == e["answer"] or failed, (e["instruction"], wrong)
        if e["kind"] == "list" and failed and all(f.startswith(("absent:", "concise")) for f in failed):
            included += 1  # passes every essential: only the rubric's pitfall sees the mistake
    assert included > 0
