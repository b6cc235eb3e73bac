"""The loop's table: evaluate's numbers per round, and the sampled answers' columns when evaluated."""

from rdpo_jax.loop import summary


def _row(r, metrics, **kw):
    return {"round": r, "status": "done", "note": "", "seconds": {}, "metrics": metrics, **kw}


def test_table_shows_the_sampled_answers_columns_only_when_evaluated():
    greedy = {"essential_pass": 0.5, "rubric_score": 0.75, "hallucination": 0.125, "accuracy": 0.5, "words": 10.0}
    rows = [_row(0, greedy), _row(1, dict(greedy, sampled={"essential_pass": 0.25, "hallucination": 0.0625}),
                                  pairs=3, loss=0.6, steps=10)]
    head, _, initial, trained = summary.table(rows).splitlines()
    assert head.endswith("| words | sampled: essential pass | sampled: hallucination |")
    assert initial.endswith("| 10.000 | – | – |")  # round 0 was evaluated greedily only
    assert trained == "| 1 | trained 10 steps | 3 | 0.6000 | 0.500 | 0.750 | 0.125 | 0.500 | 10.000 | 0.250 | 0.062 |"
    assert "sampled" not in summary.table(rows[:1])
    assert summary.metric(rows[1]["metrics"], "sampled/hallucination") == 0.0625
    assert summary.metric(rows[0]["metrics"], "sampled/hallucination") is None
