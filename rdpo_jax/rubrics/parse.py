"""Strict parsing of a model judge's reply: the JSON object among its prose (`json_object`, also what
the rubric writer reads) and the verdict it must hold for the rubric (`parse_verdict`)."""

from __future__ import annotations

import json

from rdpo_jax.data import records
from rdpo_jax.rubrics.judge import JudgeOutputError, Verdict


def json_object(text: str | None, key: str = "verdicts") -> dict:
    """The JSON object in a model's reply: the first `{` that decodes to an object holding `key`, else
    the first object that decodes. A decoder, not a regex, so braces in the prose around the JSON (a
    trailing "}", a format shown before it) do not matter; the search resumes after each decoded object,
    so an object nested in another is never taken for the answer. Raises JudgeOutputError."""
    if not isinstance(text, str):
        raise JudgeOutputError(f"the reply has no text content ({'null' if text is None else type(text).__name__})")
    decoder = json.JSONDecoder()
    first: dict | None = None
    error: json.JSONDecodeError | None = None
    start = text.find("{")
    if start < 0:
        raise JudgeOutputError("no JSON object in the reply")
    while start >= 0:
        try:
            data, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError as e:
            error, end = error or e, start + 1
        except RecursionError:  # thousands of nested brackets: no verdict, and no reason to crash
            raise JudgeOutputError("JSON nested too deep") from None
        else:
            if isinstance(data, dict) and key in data:
                return data
            first = data if first is None else first
        start = text.find("{", end)
    if first is None:
        raise JudgeOutputError(f"malformed JSON ({error.msg} at char {error.pos})")
    return first


def parse_verdict(text: str | None, rubric: dict) -> Verdict:
    """Strictly parses a judge reply.

    Args:
      text: the reply: JSON, optionally in a ``` fence or among prose. None (an OpenAI-compatible server
        sends `content: null` for a refusal or a tool call) is an invalid reply like any other.
      rubric: the item's rubric; the reply needs one entry per criterion id, no unknown ids, an integer
        score on each criterion's scale and a string reason.

    Returns:
      The verdict, scores and reasons in rubric order.

    Raises:
      JudgeOutputError: the reply is not a valid verdict (the message says why).
    """
    data = json_object(text, "verdicts")
    entries = data.get("verdicts")
    if not isinstance(entries, list):
        raise JudgeOutputError('expected {"verdicts": [...]}')
    criteria = {c["id"]: c for c in rubric["criteria"]}
    got: dict[str, tuple[float, str]] = {}
    for e in entries:
        if not isinstance(e, dict) or not isinstance(e.get("id"), str):
            raise JudgeOutputError("a verdict without a string id")
        cid = e["id"]
        if cid not in criteria:
            raise JudgeOutputError(f"unknown criterion id {cid!r}")
        if cid in got:
            raise JudgeOutputError(f"criterion {cid!r} graded twice")
        score = e.get("score")
        lo, hi = records.SCALES[criteria[cid]["scale"]]
        # json reads NaN and Infinity as floats: the range test rejects them before int() could raise
        if (isinstance(score, bool) or not isinstance(score, (int, float)) or not lo <= score <= hi
                or score != int(score)):
            raise JudgeOutputError(f"criterion {cid!r}: score {score!r} is not an integer in [{lo:g}, {hi:g}]")
        reason = e.get("reason", "")
        if not isinstance(reason, str):
            raise JudgeOutputError(f"criterion {cid!r}: reason is not a string")
        got[cid] = (float(score), reason)
    missing = [cid for cid in criteria if cid not in got]
    if missing:
        raise JudgeOutputError(f"missing criterion ids {missing}")
    return Verdict([got[c["id"]][0] for c in rubric["criteria"]], [got[c["id"]][1] for c in rubric["criteria"]])
