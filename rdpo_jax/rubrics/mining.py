"""Pair mining from judged samples of one prompt.

Rubric miner (rDPO): a chosen answer must pass every essential criterion (qualification); a rejected
answer must trail it by a reward gap ≥ `margin` under the essential gate and, if `criterion_gap` > 0,
on at least one criterion by that much (margin); at most `max_pairs` pairs per prompt, each answer in at
most one pair, and near-duplicate answers (token Jaccard ≥ `dedup`) are never paired or counted twice
(diversity). Outcome miner (the baseline): correct vs incorrect by a single outcome score.

A prompt without a pair gets a reason (REASONS): no_answers, unscorable, too_few_samples, no_qualified,
no_margin.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

from rdpo_jax.data import records
from rdpo_jax.rubrics import aggregate

REASONS = ("no_answers", "unscorable", "too_few_samples", "no_qualified", "no_margin")


@dataclasses.dataclass(frozen=True)
class Sample:
    sample_id: str
    response: str
    scores: list[float] | None  # raw, rubric order; None if unscorable
    policy_step: int = 0
    response_ids: tuple[int, ...] | None = None  # the sampler's token ids, when it recorded them
    tokenizer: str | None = None  # the fingerprint of the tokenizer of `response_ids`


@dataclasses.dataclass(frozen=True)
class Pair:
    chosen: Sample
    rejected: Sample
    meta: dict


def _tokens(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def similarity(a: str, b: str) -> float:
    ta, tb = _tokens(a), _tokens(b)
    return len(ta & tb) / len(ta | tb) if ta | tb else 1.0


def _dedup(samples: Sequence[Sample], threshold: float) -> list[Sample]:
    kept: list[Sample] = []
    for s in samples:
        if all(similarity(s.response, k.response) < threshold for k in kept):
            kept.append(s)
    return kept


def _prepare(samples: Sequence[Sample], dedup: float) -> tuple[list[Sample], str | None]:
    if not samples:
        return [], "no_answers"
    scored = [s for s in samples if s.scores is not None]
    if not scored:
        return [], "unscorable"
    scored = _dedup(scored, dedup)
    return scored, None if len(scored) >= 2 else "too_few_samples"


def _pair(candidates: Sequence[Sample], pool: Sequence[Sample], meta: Callable[[Sample, Sample], dict | None],
          max_pairs: int, dedup: float) -> list[Pair]:
    """Each candidate (best first) takes the first unused answer of `pool` (worst first) for which
    `meta(chosen, rejected)` accepts the pair (returns its metadata); each answer serves once."""
    used: set[str] = set()
    pairs: list[Pair] = []
    for chosen in candidates:
        if len(pairs) >= max_pairs or chosen.sample_id in used:
            continue
        for rejected in pool:
            if rejected.sample_id in used or rejected.sample_id == chosen.sample_id:
                continue
            info = meta(chosen, rejected)
            if info is None or similarity(chosen.response, rejected.response) >= dedup:
                continue
            used |= {chosen.sample_id, rejected.sample_id}
            pairs.append(Pair(chosen, rejected, info))
            break
    return pairs


def mine_rubric(rubric: dict, samples: Sequence[Sample], *, gate: str = "veto", margin: float = 0.1,
                criterion_gap: float = 0.0, max_pairs: int = 2, dedup: float = 0.9) -> tuple[list[Pair], str | None]:
    scored, reason = _prepare(samples, dedup)
    if reason:
        return [], reason
    reward = {s.sample_id: aggregate.reward(rubric, s.scores, gate) for s in scored}
    normalized = {s.sample_id: records.normalized_scores(rubric, s.scores) for s in scored}
    qualified = sorted((s for s in scored if aggregate.essential_pass(rubric, normalized[s.sample_id])),
                       key=lambda s: reward[s.sample_id], reverse=True)
    if not qualified:
        return [], "no_qualified"

    def meta(chosen, rejected):
        g = aggregate.gap(reward[chosen.sample_id], reward[rejected.sample_id])
        deltas = [a - b for a, b in zip(normalized[chosen.sample_id], normalized[rejected.sample_id])]
        if g < margin or (criterion_gap > 0 and max(deltas) < criterion_gap):
            return None
        return {"miner": "rubric", "gate": gate, "margin": g, "chosen_reward": list(reward[chosen.sample_id]),
                "rejected_reward": list(reward[rejected.sample_id])}

    pairs = _pair(qualified, sorted(scored, key=lambda s: reward[s.sample_id]), meta, max_pairs, dedup)
    return pairs, None if pairs else "no_margin"


def mine_outcome(samples: Sequence[Sample], outcome: Callable[[Sample], float], *, margin: float = 0.5,
                 max_pairs: int = 2, dedup: float = 0.9) -> tuple[list[Pair], str | None]:
    """The baseline: `outcome(sample)` ∈ [0, 1] (final-answer correctness, or one holistic score); pairs
    a high-outcome answer with a low one (gap ≥ margin), nothing else considered."""
    scored, reason = _prepare(samples, dedup)
    if reason:
        return [], reason
    value = {s.sample_id: outcome(s) for s in scored}
    best = sorted(scored, key=lambda s: value[s.sample_id], reverse=True)
    if value[best[0].sample_id] <= 0:
        return [], "no_qualified"

    def meta(chosen, rejected):
        g = value[chosen.sample_id] - value[rejected.sample_id]
        return {"miner": "outcome", "margin": g} if g >= margin else None

    pairs = _pair(best, sorted(scored, key=lambda s: value[s.sample_id]), meta, max_pairs, dedup)
    return pairs, None if pairs else "no_margin"


def criterion_outcome(criterion_id: str, rubric: dict) -> Callable[[Sample], float]:
    """An outcome from one criterion's normalized score (e.g. the verifier's final-answer check)."""
    index = next((i for i, c in enumerate(rubric["criteria"]) if c["id"] == criterion_id), None)
    if index is None:
        raise ValueError(f"outcome criterion {criterion_id!r} is not in the rubric")
    return lambda s: records.normalized_scores(rubric, s.scores)[index]


def correctness(rubric: dict, normalized: Sequence[float]) -> float:
    """Final-answer correctness: the `answer` criterion where the rubric has one, else 1 when every
    essential criterion passes (open questions: the content is right), 0 otherwise."""
    ids = [c["id"] for c in rubric["criteria"]]
    if "answer" in ids:
        return float(normalized[ids.index("answer")] >= aggregate.PASS)
    return float(aggregate.essential_pass(rubric, normalized))


def answer_outcome(rubric: dict) -> Callable[[Sample], float]:
    """The outcome of RLVR-style data: final-answer correctness (`correctness`), blind to everything else."""
    return lambda s: correctness(rubric, records.normalized_scores(rubric, s.scores))


def holistic_outcome(rubric: dict) -> Callable[[Sample], float]:
    """One pass/fail for the whole answer: 1 if every criterion passes, else 0."""
    return lambda s: float(all(v >= aggregate.PASS for v in records.normalized_scores(rubric, s.scores)))
