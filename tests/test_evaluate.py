"""rdpo_jax.evaluate: the per-answer numbers against hand-computed values, the summary, and a real
evaluation of an HF folder on a rule-built pool with a text-only prompt among image prompts (answers
greedy = the sampler's, verdicts = the verifier's)."""

import json
import os

import numpy as np
import pytest

from rdpo_jax import evaluate
from rdpo_jax.data import arrayrecord
from rdpo_jax.demo import world
from rdpo_jax.rubrics import generate
from rdpo_jax.rubrics.judge import Item
from rdpo_jax.rubrics.verifier import VerifierJudge, split_words


def _rubric():
    return generate.rule_rubric(dict(counts={"object": 2}, mentions=["red circle", "blue square"],
                                     details=["small red circle"], absent=["green triangle"], max_words=20))


def test_score_by_hand():
    rubric = _rubric()  # criteria: count, mentions ×2 (essential, weight 1); detail, absent, concise (0.5)
    ids = [c["id"] for c in rubric["criteria"]]
    answer = "there are two objects : a small red circle and a green triangle"
    verdict = VerifierJudge().judge([Item("x", [], [], rubric, answer)])[0]
    scores = dict(zip(ids, verdict.scores))
    assert scores == {"count:object": 1, "mentions:red circle": 1, "mentions:blue square": 0,
                      "detail:small red circle": 1, "absent:green triangle": 0, "concise": 1}
    m = evaluate.score(rubric, verdict.scores, answer)
    weights = {c["id"]: c["weight"] for c in rubric["criteria"]}
    expected = sum(weights[k] * v for k, v in scores.items()) / sum(weights.values())
    assert m == {"essential_pass": 0.0, "rubric_score": pytest.approx(expected), "accuracy": 0.0,
                 "words": 12.0, "hallucination": 1.0}


def test_summary_means_and_groups():
    rows = [{"prompt_id": "count-1", "metrics": {"accuracy": 1.0, "words": 4.0}},
            {"prompt_id": "count-2", "metrics": {"accuracy": 0.0, "words": 6.0}},
            {"prompt_id": "describe-3", "metrics": {"accuracy": 1.0, "words": 20.0, "hallucination": 1.0}},
            {"prompt_id": "describe-4", "unscorable": "timeout"}]
    s = evaluate.summarize(rows, "prefix")
    assert s["prompts"] == 4 and s["unscorable"] == 1
    assert s["accuracy"] == pytest.approx(2 / 3) and s["words"] == pytest.approx(10.0)
    assert s["hallucination"] == 1.0  # only over answers whose rubric has a pitfall criterion
    assert s["groups"] == {"count": {"prompts": 2, "accuracy": 0.5, "words": 5.0},
                           "describe": {"prompts": 1, "accuracy": 1.0, "words": 20.0, "hallucination": 1.0}}


@pytest.fixture(scope="module")
def model_and_pool(tmp_path_factory):
    """The demo world's (untrained) model and a rule-built pool of 7 image prompts and a text-only one."""
    tmp_path = tmp_path_factory.mktemp("evaluate")
    folder = str(tmp_path / "model")
    world.write_model(folder)
    prompts = world.write_prompts(str(tmp_path), "held", n=7, seed=0)
    pool = []
    for line in open(prompts):
        row = json.loads(line)
        image = open(tmp_path / row["image"], "rb").read()
        pool.append(dict(prompt_id=row["prompt_id"], images=[image], messages=world.messages(row["instruction"]),
                         rubric=generate.rule_rubric(row["ground_truth"])))
    # a text-only prompt in the middle: answered in a batch of its own, reported in pool order
    pool.insert(2, dict(pool[2], prompt_id=pool[2]["prompt_id"] + "-text", images=[],
                        messages=[{"role": "user", "content": pool[2]["messages"][0]["content"][1]["text"]}]))
    arrayrecord.write(str(tmp_path), "pool", "rubric_pool", pool)
    return folder, str(tmp_path / "pool"), pool


def test_evaluate_an_hf_folder(tmp_path, model_and_pool):
    folder, pool_path, pool = model_and_pool
    out = str(tmp_path / "eval")
    metrics = evaluate.evaluate(folder, pool_path, out, judge=VerifierJudge(), max_new_tokens=6,
                                batch_size=4, group="prefix")
    assert "sampled" not in metrics and not os.path.exists(os.path.join(out, "sampled_answers.jsonl"))
    rows = [json.loads(line) for line in open(os.path.join(out, "answers.jsonl"))]
    assert [r["prompt_id"] for r in rows] == [p["prompt_id"] for p in pool]
    assert metrics == json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["prompts"] == 8 and metrics["unscorable"] == 0 and metrics["judge"] == "verifier"
    assert set(metrics["groups"]) == set(world.KINDS)
    # every answer is re-judged the same way by the verifier: the file holds the verdicts it produced
    verifier = VerifierJudge()
    for r, p in zip(rows, pool):
        v = verifier.judge([Item(r["prompt_id"], p["messages"], p["images"], p["rubric"], r["answer"])])[0]
        assert r["scores"] == v.scores
    assert all(len(split_words(r["answer"])) <= 6 for r in rows)  # 6 new tokens at most
    assert metrics["words"] == pytest.approx(np.mean([len(split_words(r["answer"])) for r in rows]))


def test_sampled_answers(tmp_path, model_and_pool):
    """--samples: N judged answers per prompt in pool order, summarized under `sampled` exactly as the rows
    say; the same answers whatever the batching (per-prompt keys); near temperature 0 they are the greedy
    answers."""
    folder, pool_path, pool = model_and_pool

    def run(name, **kw):
        metrics = evaluate.evaluate(folder, pool_path, str(tmp_path / name), judge=VerifierJudge(), max_new_tokens=6,
                                    group="prefix", **kw)
        return metrics, [json.loads(line) for line in open(tmp_path / name / "sampled_answers.jsonl")]

    metrics, rows = run("a", samples=3, temperature=1.0, seed=5, batch_size=4)
    assert [(r["prompt_id"], r["sample"]) for r in rows] == [(p["prompt_id"], j) for p in pool for j in range(3)]
    sampled = metrics["sampled"]
    assert (sampled["prompts"], sampled["answers"], sampled["samples"], sampled["seed"]) == (8, 24, 3, 5)
    for k in ("essential_pass", "rubric_score", "accuracy", "words"):
        assert sampled[k] == pytest.approx(np.mean([r["metrics"][k] for r in rows])), k
    assert sampled["groups"]["count"]["prompts"] == sum(p["prompt_id"].startswith("count") for p in pool)
    greedy = [json.loads(line)["answer"] for line in open(tmp_path / "a" / "answers.jsonl")]
    assert len({r["answer"] for r in rows}) > len(set(greedy))  # temperature 1 varies the answers

    _, rebatched = run("b", samples=3, temperature=1.0, seed=5, batch_size=3)
    assert [r["answer"] for r in rebatched] == [r["answer"] for r in rows]
    _, cold = run("c", samples=2, temperature=1e-5, seed=5, batch_size=4)
    assert [r["answer"] for r in cold] == [a for a in greedy for _ in range(2)]
    with pytest.raises(ValueError, match="temperature > 0"):
        evaluate.evaluate(folder, pool_path, str(tmp_path / "d"), judge=VerifierJudge(), samples=2, temperature=0.0)


def test_command_refuses_sampling_without_temperature(tmp_path, capsys):
    """The flags are checked before any model is loaded: the error names both values (the command, in this
    process)."""
    from tests import runs

    with pytest.raises(SystemExit) as refused:
        runs.call("rdpo_jax.evaluate", f"--model={tmp_path}/none", f"--pool={tmp_path}/none", f"--out={tmp_path}/out",
                  "--samples=2", "--temperature=0")
    refusal = "samples=2, temperature=0.0: sampled answers need samples ≥ 1 and a temperature > 0"
    assert refused.value.code != 0 and refusal in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")
