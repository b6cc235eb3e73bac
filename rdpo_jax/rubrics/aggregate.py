"""One answer's reward from its criterion scores, with an optional gate on the essential criteria.

Scores are normalized to [0, 1] (binary 0/1; a 1–5 score s → (s − 1)/4). A criterion passes when its
normalized score is at least 0.5 (binary: 1; 1–5: 3 or more).

  none           Σ w·s / Σ w over all criteria
  veto           0 if an essential criterion fails, else as `none`
  lexicographic  (essential weighted mean, additional weighted mean), compared in that order
"""

from __future__ import annotations

from collections.abc import Sequence

from rdpo_jax.data import records

GATES = ("none", "veto", "lexicographic")
PASS = 0.5


def _mean(values: Sequence[float], weights: Sequence[float]) -> float:
    total = sum(weights)
    return sum(v * w for v, w in zip(values, weights)) / total if total else 0.0


def essential_pass(rubric: dict, normalized: Sequence[float]) -> bool:
    return all(s >= PASS for s, c in zip(normalized, rubric["criteria"]) if c["kind"] == "essential")


def reward(rubric: dict, raw_scores: Sequence[float], gate: str = "none") -> tuple[float, float]:
    """The reward as a pair compared lexicographically: (essential part, additional part) for
    `lexicographic`, (reward, 0) otherwise — so every gate ranks answers by plain tuple comparison."""
    if gate not in GATES:
        raise ValueError(f"essential_gate {gate!r} is not one of {GATES}")
    crit = rubric["criteria"]
    s = records.normalized_scores(rubric, raw_scores)
    w = [c["weight"] for c in crit]
    if gate == "lexicographic":
        ess = [i for i, c in enumerate(crit) if c["kind"] == "essential"]
        add = [i for i, c in enumerate(crit) if c["kind"] == "additional"]
        return _mean([s[i] for i in ess], [w[i] for i in ess]), _mean([s[i] for i in add], [w[i] for i in add])
    if gate == "veto" and not essential_pass(rubric, s):
        return 0.0, 0.0
    return _mean(s, w), 0.0


def gap(better: tuple[float, float], worse: tuple[float, float]) -> float:
    """How far `better` beats `worse`: the first component's gap, or the second's when the first ties."""
    return better[0] - worse[0] if better[0] != worse[0] else better[1] - worse[1]
