"""The deterministic verifier judge (data with ground truth): evaluates each criterion's machine check
(records.CHECKS) on the answer's words; a rubric with a criterion without a check is unscorable.

`split_words` is also how answer lengths are counted (the length budget, evaluate's `words`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from rdpo_jax.rubrics.judge import Item, Verdict

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


def _find(words: list[str], phrase: str) -> list[int]:
    """Where `phrase` starts in `words` (singular and plural alike), every occurrence."""
    target = [_singular(w) for w in split_words(phrase)]
    norm = [_singular(w) for w in words]
    n = len(target)
    return [i for i in range(len(norm) - n + 1) if norm[i:i + n] == target]


def _contains(words: list[str], phrase: str) -> bool:
    return bool(_find(words, phrase)) if split_words(phrase) else True


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
        if spec.get("after"):  # the final answer: the words after the marker's last occurrence
            starts = _find(words, spec["after"])
            if not starts:
                return 0.0, f"gives no final answer after '{spec['after']}' (truth '{spec['value']}')"
            words = words[starts[-1] + len(split_words(spec["after"])):]
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
