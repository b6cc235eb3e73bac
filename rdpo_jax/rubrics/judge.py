"""The judge interface: what a judge is given (`Item`), what it returns (`Verdict`), the `Judge`
protocol, and the error a model judge's invalid reply raises (`JudgeOutputError`).

A judge turns items (a prompt with its images and rubric, plus one answer) into verdicts: a raw score
and a short reason per criterion, in rubric order, or the reason the item could not be scored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol


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
