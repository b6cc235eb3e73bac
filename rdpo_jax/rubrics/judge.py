"""The judge interface, the rubric prompt every model judge uses, strict verdict parsing, and the
deterministic verifier judge.

A judge turns items (a prompt with its images and rubric, plus one answer) into verdicts: a raw score
and a short reason per criterion, in rubric order, or the reason the item could not be scored.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from typing import Protocol

from rdpo_jax.data import records

PROMPT_VERSION = "rdpo-rubric-judge-v1"


@dataclasses.dataclass(frozen=True)
class Item:
    key: str  # stable identity of the item (the sample id)
    messages: list[dict]
    images: list[bytes]
    rubric: dict
    answer: str
    reference_answer: str | None = None


@dataclasses.dataclass(frozen=True)
class Verdict:
    scores: list[float] = dataclasses.field(default_factory=list)  # raw, on each criterion's scale
    reasons: list[str] = dataclasses.field(default_factory=list)
    unscorable: str | None = None  # why there is no verdict (after retries)

    @classmethod
    def failed(cls, reason: str) -> Verdict:
        return cls(unscorable=reason)


class Judge(Protocol):
    name: str  # recorded with every verdict

    def judge(self, items: Sequence[Item]) -> list[Verdict]: ...


class JudgeOutputError(ValueError):
    """A model judge's reply is not a valid verdict for the rubric."""


# ----- the rubric prompt -----

def instruction_text(messages: list[dict]) -> str:
    parts = []
    for m in messages:
        content = m["content"]
        text = content if isinstance(content, str) else " ".join(p["text"] for p in content if p["type"] == "text")
        parts.append(f"{m['role']}: {text}")
    return "\n".join(parts)


def judge_messages(item: Item) -> list[dict]:
    """Chat messages asking a (vision-language) judge for one verdict per criterion, as JSON.

    Images come first as image parts (the HTTP judge turns them into data URLs)."""
    criteria = "\n".join(
        f'- id "{c["id"]}" ({c["kind"]}, scale {"0 or 1" if c["scale"] == "binary" else "1 to 5"}): {c["text"]}'
        for c in item.rubric["criteria"])
    reference = f"\nA reference answer (for you only):\n{item.reference_answer}\n" if item.reference_answer else ""
    text = (
        "You grade an assistant's answer to a question about the image(s) with a rubric, criterion by "
        f"criterion.\n\nConversation:\n{instruction_text(item.messages)}\n{reference}\nAnswer to grade:\n"
        f"{item.answer}\n\nCriteria:\n{criteria}\n\nReply with JSON only, exactly one entry per criterion id:\n"
        '{"verdicts": [{"id": "<criterion id>", "score": <number on its scale>, "reason": "<one short sentence>"}]}')
    return [{"role": "user", "content": [{"type": "image"} for _ in item.images] + [{"type": "text", "text": text}]}]


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


# ----- deterministic verifier (data with ground truth) -----

NUMBERS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
NUMBERS.update(no=0, a=1, an=1, single=1)


def split_words(text: str) -> list[str]:
    """Lower-case words and numbers (punctuation dropped): what every check and the length budget count."""
    return re.findall(r"[a-z0-9]+", text.lower())


def _singular(word: str) -> str:
    if len(word) > 4 and word.endswith(("xes", "ches", "shes", "sses")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def _contains(words: list[str], phrase: str) -> bool:
    target = [_singular(w) for w in split_words(phrase)]
    norm = [_singular(w) for w in words]
    n = len(target)
    return any(norm[i:i + n] == target for i in range(len(norm) - n + 1)) if n else True


def _stated_count(words: list[str], noun: str) -> int | None:
    """The number written before `noun` — a digit or number word, up to 3 words back so that adjectives
    may come between ("two red circles") — at its first mention with one; None if never stated."""
    target = _singular(split_words(noun)[-1])
    for i, w in enumerate(words):
        if _singular(w) != target:
            continue
        for prev in reversed(words[max(i - 3, 0):i]):
            if prev in NUMBERS:
                return NUMBERS[prev]
            if prev.isdigit():
                return int(prev)
    return None


def check(spec: dict, answer: str) -> tuple[float, str]:
    """Evaluates one machine-checkable criterion (records.CHECKS) on an answer: (0 or 1, reason)."""
    words = split_words(answer)
    kind = spec["type"]
    if kind == "contains":
        ok = _contains(words, spec["phrase"])
        return float(ok), f"{'mentions' if ok else 'does not mention'} '{spec['phrase']}'"
    if kind == "not_contains":
        ok = not _contains(words, spec["phrase"])
        return float(ok), f"{'does not mention' if ok else 'mentions'} '{spec['phrase']}'"
    if kind == "count":
        stated = _stated_count(words, spec["noun"])
        ok = stated == spec["value"]
        return float(ok), f"states {stated if stated is not None else 'no'} {spec['noun']} (truth {spec['value']})"
    if kind == "answer":
        said = [o for o in spec["options"] if _contains(words, o)] or ([spec["value"]] if _contains(
            words, spec["value"]) else [])
        ok = said == [spec["value"]]  # the right answer, and no other option besides
        return float(ok), f"answers {said or 'nothing recognisable'} (truth '{spec['value']}')"
    if kind == "max_words":
        ok = len(words) <= spec["value"]
        return float(ok), f"{len(words)} words (limit {spec['value']})"
    raise ValueError(f"unknown check type {kind!r}")


class VerifierJudge:
    """Scores criteria that carry a `check` by evaluating it on the answer; an item whose rubric has a
    criterion without a check is unscorable (this judge never guesses)."""

    name = "verifier"

    def judge(self, items: Sequence[Item]) -> list[Verdict]:
        out = []
        for item in items:
            unchecked = [c["id"] for c in item.rubric["criteria"] if "check" not in c]
            if unchecked:
                out.append(Verdict.failed(f"criteria without a check: {unchecked}"))
                continue
            results = [check(c["check"], item.answer) for c in item.rubric["criteria"]]
            out.append(Verdict([s for s, _ in results], [r for _, r in results]))
        return out


def make_judge(kind: str, *, model: str = "", endpoint: str = "", api_key_env: str = "OPENAI_API_KEY",
               timeout: float = 120.0, concurrency: int = 8, cache: str = "", max_retry_after: float = 60.0) -> Judge:
    """The judge named `kind`: "verifier"; "openai" (`model` at `endpoint`, verdicts cached in the SQLite
    file `cache`, a server's Retry-After obeyed up to `max_retry_after` seconds); "flax" (`model`: an HF
    folder or run directory)."""
    if kind == "verifier":
        return VerifierJudge()
    if not model:
        raise ValueError(f"judge {kind!r} needs a judge model")
    if kind == "openai":
        from rdpo_jax.rubrics import http

        if not endpoint or not cache:
            raise ValueError("judge 'openai' needs an endpoint and a cache file")
        client = http.ChatClient(endpoint, model, api_key_env=api_key_env, timeout=timeout,
                                 max_retry_after=max_retry_after)
        return http.OpenAIJudge(client, http.VerdictCache(cache), concurrency=concurrency)
    if kind == "flax":
        from rdpo_jax import checkpoint
        from rdpo_jax.rubrics.local import FlaxJudge

        judge_model, cfg, folder, _ = checkpoint.load_model(model)
        return FlaxJudge(judge_model, cfg, folder, name=model)
    raise ValueError(f"unknown judge {kind!r}: verifier | openai | flax")
