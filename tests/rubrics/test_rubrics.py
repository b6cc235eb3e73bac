"""Verifier judge, verdict parsing, aggregation gates, rubric generation and both miners on hand-made
cases whose answers are known."""

import pytest

from rdpo_jax.data import records
from rdpo_jax.rubrics import aggregate, generate, mining
from rdpo_jax.rubrics.judge import Item, JudgeOutputError
from rdpo_jax.rubrics.parse import parse_verdict
from rdpo_jax.rubrics.verifier import VerifierJudge, check

GT = {"answer": "two", "options": ["one", "two", "three"], "counts": {"circle": 2}, "mentions": ["red circle"],
      "details": ["left"], "absent": ["square"], "max_words": 12}


def test_rule_rubric_from_ground_truth():
    rubric = generate.rule_rubric(GT)
    kinds = {c["id"]: c["kind"] for c in rubric["criteria"]}
    assert kinds == {"answer": "essential", "count:circle": "essential", "mentions:red circle": "essential",
                     "detail:left": "additional", "absent:square": "additional", "concise": "additional"}
    assert all(c["scale"] == "binary" and "check" in c for c in rubric["criteria"])
    records.check_rubric(rubric, "test")  # valid by the record schema


@pytest.mark.parametrize("answer,expected", [
    ("There are two red circles on the left.", [1, 1, 1, 1, 1, 1]),
    ("Two red circles and a square, on the left side of the picture, next to nothing else", [1, 1, 1, 1, 0, 0]),
    ("I see three blue circles.", [0, 0, 0, 0, 1, 1]),
    ("One red circle.", [0, 0, 1, 0, 1, 1]),
])
def test_verifier_judge(answer, expected):
    rubric = generate.rule_rubric(GT)
    verdict = VerifierJudge().judge([Item("k", [], [], rubric, answer)])[0]
    assert verdict.unscorable is None and verdict.scores == expected
    assert len(verdict.reasons) == 6 and all(verdict.reasons)


def test_verifier_refuses_criteria_without_checks():
    rubric = {"criteria": [{"id": "x", "text": "Is kind", "kind": "essential", "weight": 1.0, "scale": "binary"}]}
    verdict = VerifierJudge().judge([Item("k", [], [], rubric, "hello")])[0]
    assert verdict.unscorable == "criteria without a check: ['x']"


def test_count_check_reads_number_words_digits_and_adjectives():
    spec = {"type": "count", "noun": "star", "value": 3}
    assert check(spec, "3 stars")[0] == 1 and check(spec, "three small yellow stars")[0] == 1
    assert check(spec, "two stars")[0] == 0 and check(spec, "stars everywhere")[0] == 0
    assert check({"type": "count", "noun": "box", "value": 2}, "two boxes")[0] == 1


def test_answer_check_after_a_marker_reads_only_the_final_answer():
    spec = generate.rule_rubric({"answer": "red", "options": ["red", "blue"], "answer_after": "answer :"})["criteria"][0]["check"]
    assert spec["after"] == "answer :"
    bad = {"criteria": [{"id": "a", "text": "t", "kind": "essential", "weight": 1.0, "scale": "binary",
                         "check": dict(spec, after=3)}]}
    with pytest.raises(records.RecordError, match=r"criteria\[0\]\.check\.after"):
        records.check_rubric(bad, "test")
    reasoning = "a red square and a blue circle ."
    assert check(spec, f"{reasoning} answer : red .")[0] == 1  # the options the reasoning names do not count
    assert check(spec, f"{reasoning} answer : blue .")[0] == 0
    assert check(spec, "answer : blue . no , answer : red .")[0] == 1  # the last final answer
    score, reason = check(spec, reasoning)
    assert score == 0 and reason == "gives no final answer after 'answer :' (truth 'red')"
    # without the marker the whole answer is read: two options named is no answer
    assert check({k: v for k, v in spec.items() if k != "after"}, f"{reasoning} answer : red .")[0] == 0


RUBRIC = {"criteria": [
    {"id": "e1", "text": "a", "kind": "essential", "weight": 2.0, "scale": "binary"},
    {"id": "e2", "text": "b", "kind": "essential", "weight": 1.0, "scale": "binary"},
    {"id": "a1", "text": "c", "kind": "additional", "weight": 1.0, "scale": "1-5"}]}


def test_aggregation_gates():
    good, fails_e2 = [1, 1, 5], [1, 0, 5]
    assert aggregate.reward(RUBRIC, good, "none") == (1.0, 0.0)
    assert aggregate.reward(RUBRIC, fails_e2, "none") == (3 / 4, 0.0)  # (2·1 + 1·0 + 1·1) / 4
    assert aggregate.reward(RUBRIC, fails_e2, "veto") == (0.0, 0.0)
    assert aggregate.reward(RUBRIC, fails_e2, "lexicographic") == (2 / 3, 1.0)
    assert aggregate.reward(RUBRIC, [1, 1, 1], "lexicographic") == (1.0, 0.0)
    # lexicographic: essentials decide first; additional criteria only break ties
    assert aggregate.gap((1.0, 0.0), (2 / 3, 1.0)) == pytest.approx(1 / 3)
    assert aggregate.gap((1.0, 0.75), (1.0, 0.25)) == 0.5
    with pytest.raises(ValueError, match="essential_gate 'soft'"):
        aggregate.reward(RUBRIC, good, "soft")


def _s(i, text, scores):
    return mining.Sample(f"s{i}", text, scores)


def test_rubric_miner_qualification_margin_and_diversity():
    samples = [_s(0, "alpha beta gamma", [1, 1, 5]),  # best, qualified
               _s(1, "alpha beta gamma", [1, 1, 4]),  # a near duplicate of s0: never counted twice
               _s(2, "delta epsilon", [1, 1, 3]),  # qualified, reward 0.875
               _s(3, "zeta eta", [0, 1, 5]),  # fails an essential: reward 0 under veto
               _s(4, "theta iota", [1, 0, 1]),  # fails an essential: reward 0 too (ties keep sample order)
               _s(5, "kappa", None)]  # unscorable
    pairs, reason = mining.mine_rubric(RUBRIC, samples, gate="veto", margin=0.5, max_pairs=3)
    assert reason is None
    assert [(p.chosen.sample_id, p.rejected.sample_id) for p in pairs] == [("s0", "s3"), ("s2", "s4")]
    assert pairs[0].meta["margin"] == 1.0 and pairs[0].meta["miner"] == "rubric"
    one, _ = mining.mine_rubric(RUBRIC, samples, gate="veto", margin=0.5, max_pairs=1)
    assert len(one) == 1
    none, reason = mining.mine_rubric(RUBRIC, samples[2:3] + samples[1:2], gate="none", margin=0.5)
    assert none == [] and reason == "no_margin"


def test_rubric_miner_criterion_gap_and_reasons():
    a, b = _s(0, "one two", [1, 1, 5]), _s(1, "three four", [1, 1, 4])  # reward gap 0.0625, a1 gap 0.25
    assert mining.mine_rubric(RUBRIC, [a, b], gate="none", margin=0.05, criterion_gap=0.5) == ([], "no_margin")
    assert len(mining.mine_rubric(RUBRIC, [a, b], gate="none", margin=0.05, criterion_gap=0.2)[0]) == 1
    assert mining.mine_rubric(RUBRIC, [_s(0, "x", None)]) == ([], "unscorable")
    assert mining.mine_rubric(RUBRIC, [a]) == ([], "too_few_samples")
    assert mining.mine_rubric(RUBRIC, []) == ([], "no_answers")
    assert mining.mine_outcome([], lambda s: 1.0) == ([], "no_answers")
    assert mining.mine_rubric(RUBRIC, [_s(0, "x y", [0, 0, 5]), _s(1, "z w", [0, 1, 1])]) == ([], "no_qualified")


def test_every_reason_a_miner_gives_is_in_reasons():
    a, b = _s(0, "one two", [1, 1, 5]), _s(1, "three four", [1, 1, 4])
    unqualified = [_s(0, "x y", [0, 0, 5]), _s(1, "z w", [0, 1, 1])]
    cases = [[], [_s(0, "x", None)], [a], [a, b], unqualified]
    reasons = {mining.mine_rubric(RUBRIC, samples, gate="none", margin=0.5)[1] for samples in cases}
    reasons |= {mining.mine_outcome(samples, lambda s: 0.0)[1] for samples in cases[:3] + [[a, b]]}
    reasons |= {mining.mine_outcome([a, b], lambda s: 1.0)[1]}  # both right: no margin
    assert reasons == set(mining.REASONS)  # every path reached, and no reason missing from the list


def test_outcome_miner_only_sees_the_outcome():
    samples = [_s(0, "right but rambling", [1, 0, 1]), _s(1, "wrong answer", [0, 1, 5]),
               _s(2, "right and complete", [1, 1, 5])]
    outcome = mining.criterion_outcome("e1", RUBRIC)
    pairs, reason = mining.mine_outcome(samples, outcome, margin=0.5, max_pairs=2)
    assert reason is None and len(pairs) == 1  # only one wrong answer to pair with
    assert pairs[0].rejected.sample_id == "s1" and pairs[0].meta == {"miner": "outcome", "margin": 1.0}
    holistic = mining.holistic_outcome(RUBRIC)
    assert [holistic(s) for s in samples] == [0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="outcome criterion 'zz'"):
        mining.criterion_outcome("zz", RUBRIC)


@pytest.mark.parametrize("reply,error", [
    ("no json here", "no JSON object"),
    ('{"verdicts": [{"id": "e1", "score": 1,', "no JSON object|malformed JSON"),
    ('{"scores": []}', 'expected {"verdicts"'),
    ('{"verdicts": [{"id": "e1", "score": 1, "reason": ""}, {"id": "e2", "score": 0, "reason": ""}]}',
     r"missing criterion ids \['a1'\]"),
    ('{"verdicts": [{"id": "e1", "score": 1}, {"id": "e2", "score": 1}, {"id": "a1", "score": 3}, '
     '{"id": "zz", "score": 1}]}', "unknown criterion id 'zz'"),
    ('{"verdicts": [{"id": "e1", "score": 2}, {"id": "e2", "score": 1}, {"id": "a1", "score": 3}]}',
     r"score 2 is not an integer in \[0, 1\]"),
    ('{"verdicts": [{"id": "e1", "score": 1}, {"id": "e2", "score": 1}, {"id": "a1", "score": 3.5}]}',
     r"score 3.5 is not an integer in \[1, 5\]"),
    ('{"verdicts": [{"id": "e1", "score": 1}, {"id": "e1", "score": 1}]}', "graded twice"),
    # json reads NaN and Infinity: they are rejected as scores, never crash int()
    ('{"verdicts": [{"id": "e1", "score": NaN}, {"id": "e2", "score": 1}, {"id": "a1", "score": 3}]}',
     r"score nan is not an integer in \[0, 1\]"),
    ('{"verdicts": [{"id": "e1", "score": 1}, {"id": "e2", "score": 1}, {"id": "a1", "score": Infinity}]}',
     r"score inf is not an integer in \[1, 5\]"),
    ('{"verdicts": [{"id": ["e1"], "score": 1}]}', "a verdict without a string id"),
    ('Sure {not json} and {"verdicts": [', "malformed JSON"),
    ('{"verdicts": ' + "[" * 5000 + "}", "JSON nested too deep"),
    (None, r"the reply has no text content \(null\)"),  # `content: null` from an OpenAI-compatible server
])
def test_parse_verdict_is_strict(reply, error):
    with pytest.raises(JudgeOutputError, match=error):
        parse_verdict(reply, RUBRIC)


def test_parse_verdict_accepts_fenced_json_in_rubric_order():
    reply = ('Here you go:\n```json\n{"verdicts": [{"id": "a1", "score": 4, "reason": "ok"}, '
             '{"id": "e2", "score": 0, "reason": "no"}, {"id": "e1", "score": 1, "reason": "yes"}]}\n```')
    verdict = parse_verdict(reply, RUBRIC)
    assert verdict.scores == [1.0, 0.0, 4.0] and verdict.reasons == ["yes", "no", "ok"]


GOOD = '{"verdicts": [{"id": "e1", "score": 1, "reason": "a"}, {"id": "e2", "score": 0, "reason": "b"}, ' \
       '{"id": "a1", "score": 5, "reason": "c"}]}'


@pytest.mark.parametrize("reply", [
    GOOD + " Hope this helps {:}",  # braces after the JSON
    GOOD + "\n(that is all})",
    'Use the form {id: score}, e.g. {"id": "x"}.\n' + GOOD,  # not JSON, then an object that is not the verdict
    "```json\n" + GOOD + "\n```\nAnything else? {}",
])
def test_parse_verdict_decodes_the_json_among_braces_in_prose(reply):
    verdict = parse_verdict(reply, RUBRIC)
    assert verdict.scores == [1.0, 0.0, 5.0] and verdict.reasons == ["a", "b", "c"]
