"""Token layouts for preference pairs and SFT examples: the host half of packing, prompt groups → a
`batch.Batch` (`logps.py` is the in-jit half: the mask and the log-likelihood gathers).

Shared-prefix layout (one row per pair) — the image and prompt are encoded once:

    tokens     [ prompt P ][ chosen C ][ rejected R ][ pad ]
    positions   0 … P−1     P … P+C−1  P … P+R−1     0
    branch      0           1          2             −1

    mask(q, k) = valid(q) ∧ valid(k) ∧ k ≤ q ∧ ¬(branch(q) = 2 ∧ branch(k) = 1)

Concat layout (what TRL and Tunix do): two rows per pair, `[prompt][chosen]` in row 2i and
`[prompt][rejected]` in row 2i+1, each a plain causal sequence (branch 1 resp. 2); the image is encoded
twice. Keeping a pair's rows adjacent keeps them on one device when rows are sharded. SFT rows are
`[prompt][answer]` with branch 1.

M-RoPE families (Qwen2.5-VL) carry positions int32[R, 3, T]: the prompt's (t, h, w) rows as
`models/qwen2_5_vl/positions.rope_index` gives them (`Pair.positions`), and every answer counting on from the
prompt's largest position + 1 on all three rows (in the shared-prefix row both answers start there, as
two separate forwards would); 1D positions are the case where the prompt counts 0 … P−1.

Multi-answer layout (one row per prompt group, the on-policy case where a prompt yields several pairs):

    tokens     [ prompt P ][ answer 1 ][ answer 2 ] … [ answer m ][ pad ]
    branch      0           1           2              m            −1

every answer restarting positions after the prompt and attending to the prompt and itself only; the
group's pairs name their answers by branch (`pair_chosen`, `pair_rejected` int32[R, P], 0 = no pair), so an
answer shared by several pairs is encoded once. The other layouts are its special cases (branch 1 the
chosen answer, 2 the rejected one), and one mask serves all three:

    mask(q, k) = valid(q) ∧ valid(k) ∧ k ≤ q ∧ (branch(k) = 0 ∨ branch(k) = branch(q))

Short groups can share a row (`data.groups_per_row`, `plan_rows` choosing which): one segment after
another, each with its own prompt, images and positions from 0, its answers numbered on after the
previous segment's, and `segment_ids` int32[R, T] adding segment(q) = segment(k) to the mask, so that
every pair's log-likelihoods are those of its group alone in a row:

    tokens     [ prompt₁ ][ a₁ ][ a₂ ][ prompt₂ ][ a₃ ][ a₄ ][ a₅ ][ pad ]
    segment     0          0     0     1          1     1     1    −1
    branch      0          1     2     0          3     4     5    −1

Every layout names its trained tokens the same way: `targets` int32[R, A] (the answer tokens),
`target_index` int32[R, A] (the row index whose hidden state predicts that token: the previous token of
the same branch, the last prompt token for an answer's first token) and `target_branch` int32[R, A]
(1 chosen/answer, 2 rejected — the answer's branch in a multi-answer row —, 0 padding). Only those
A ≪ T positions go through the LM head.

Every example is a `Group` (a pair is a group of one pair, an SFT example one of one answer and no pair)
and `pack` is the one function that turns them into a batch: its unit is a group (or a row of groups),
whose P pair slots hold the per-pair fields and `valid` ([U, P], see `batch.py`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from rdpo_jax.batch import Batch, blank

LAYOUTS = ("shared_prefix", "concat", "multi_answer")
PAD_BRANCH, PROMPT, CHOSEN, REJECTED = -1, 0, 1, 2


class PromptTooLongError(ValueError):
    """A prompt (image tokens included) does not fit the row: prompts are never truncated."""


@dataclasses.dataclass(frozen=True)
class Group:
    """One prompt (token ids, image placeholders included) with its answers and the preference pairs
    among them, (chosen, rejected) indexes into `answers`: a pair is `Group(prompt, [chosen, rejected])`,
    an SFT example `Group(prompt, [answer], ())`. `fields`: per-pair arrays [n_pairs, …] (rubric scores,
    reference log-likelihoods) for the batch's pair slots; `valid` False: a padding example."""
    prompt: Sequence[int]
    answers: Sequence[Sequence[int]]
    pairs: Sequence[tuple[int, int]] = ((0, 1),)
    positions: np.ndarray | None = None  # the prompt's M-RoPE positions int[3, P]; None = 0 … P−1
    fields: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    valid: bool = True


def _fill_row(out: dict, r: int, prompt, answers: Sequence[tuple[int, Sequence[int]]], positions=None,
              start: tuple[int, int] = (0, 0), segment: int = 0) -> tuple[int, int]:
    """Writes one prompt and its (branch, answer)s into row r from token t and target a (`start`), every
    answer restarting positions after the prompt; returns the (t, a) after them. Rows with `segment_ids`
    (packed multi-answer rows) mark these tokens as `segment`."""
    P = len(prompt)
    positions = np.arange(P) if positions is None else np.asarray(positions)
    if positions.shape[-1] != P or positions.ndim > out["positions"].ndim - 1:
        raise ValueError(f"prompt positions of shape {positions.shape} for a prompt of {P} tokens in rows of "
                         f"positions {out['positions'].shape[1:]}")
    first = int(positions.max()) + 1
    t, a = start
    out["input_ids"][r, t:t + P] = prompt
    out["positions"][r, ..., t:t + P] = positions
    out["branch_ids"][r, t:t + P] = PROMPT
    last, t = t + P - 1, t + P
    for branch, answer in answers:
        n = len(answer)
        out["input_ids"][r, t:t + n] = answer
        out["positions"][r, ..., t:t + n] = np.arange(first, first + n)
        out["branch_ids"][r, t:t + n] = branch
        out["targets"][r, a:a + n] = answer
        out["target_index"][r, a:a + n] = [last] + list(range(t, t + n - 1))
        out["target_branch"][r, a:a + n] = branch
        t, a = t + n, a + n
    if "segment_ids" in out:
        out["segment_ids"][r, start[0]:t] = segment
    return t, a


def _share(lengths: Sequence[int], room: int) -> list[int]:
    """Token budgets for answers of these lengths in `room` tokens: as much as fits, the shorter answers
    whole and the longer cut to equal shares of what remains."""
    budgets = list(lengths)
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    left = room
    for k, i in enumerate(order):
        budgets[i] = min(lengths[i], left // (len(order) - k))
        left -= budgets[i]
    return budgets


def _truncate(answer: Sequence[int], budget: int, stats: dict) -> list[int]:
    answer = list(answer)
    if len(answer) > budget:
        stats["truncated_answers"] += 1
        stats["truncated_tokens"] += len(answer) - budget
        answer = answer[:budget]
    return answer


def pack(groups: Sequence[Group], *, layout: str, seq_len: int, max_answer_len: int, max_pairs: int = 1,
         max_answers: int = 2, pad_id: int = 0, mrope: bool = False, rows: Sequence[Sequence[int]] | None = None,
         groups_per_row: int = 1, images: dict | None = None) -> tuple[Batch, dict[str, int]]:
    """Packs prompt groups into a batch of `layout` ("sft" or one of `LAYOUTS`; host side, numpy).

    A unit is one group, or with `rows` (each row's groups, at most `groups_per_row`, as `plan_rows` gives
    them; SFT and multi_answer) one row of groups as segments: positions restart at 0, nothing attends
    across segments, answers are numbered on after the previous segment's, and the batch has `segment_ids`
    (−1 padding). Each answer is cut to `max_answer_len` tokens and to the room its row leaves (shared
    prefix: the shorter answer keeps what it can, up to half; multi_answer: `_share`), counted in stats.

    A unit has P = groups_per_row · max_pairs pair slots (SFT: 1), slot s·max_pairs + j holding pair j of
    segment s; `valid` [U, P] marks the slots of valid groups' pairs, and the groups' `fields` fill them
    (zero elsewhere). Rows: shared_prefix P per group, concat 2P (rows 2i, 2i+1: pair i's chosen and
    rejected), an unused slot repeating the group's first pair cut to one token per answer; multi_answer and
    SFT one per unit, with `pair_chosen`, `pair_rejected` [U, P] naming multi_answer's answer branches (0 in
    unused slots). Trained tokens per row A: every answer a row holds at its longest (2·max_answer_len
    shared_prefix, max_answers · max_answer_len multi_answer, per segment), at most seq_len − 1. `images`:
    the units' image arrays (the family adapter's collate). Positions int32[R, 3, T] with `mrope`.

    Returns (batch, stats: truncated_answers, truncated_tokens).

    Raises:
      PromptTooLongError: a prompt leaves no room for its answers (naming the pair or group);
      ValueError: a group breaks a limit or a pair names an answer it does not have.
    """
    if rows is not None and layout not in ("sft", "multi_answer"):
        raise ValueError(f"{layout} rows hold one group each")
    units = [[i] for i in range(len(groups))] if rows is None else rows
    if any(len(r) > groups_per_row for r in units):
        raise ValueError(f"rows of {max(map(len, units))} groups, more than groups_per_row={groups_per_row}")
    sft, per_unit = layout == "sft", 1 if layout in ("sft", "multi_answer") else max_pairs * rows_per_pair(layout)
    slots = 1 if sft else groups_per_row * max_pairs
    answers = {"sft": 1, "shared_prefix": 2, "concat": 1, "multi_answer": max_answers}[layout]
    R, A = len(units) * per_unit, min(groups_per_row * answers * max_answer_len, seq_len - 1)
    out = {"input_ids": blank("input_ids", (R, seq_len), pad_id),
           "positions": blank("positions", (R, 3, seq_len) if mrope else (R, seq_len)),
           **{k: blank(k, (R, seq_len)) for k in ("branch_ids",) + (("segment_ids",) if rows is not None else ())},
           **{k: blank(k, (R, A)) for k in ("targets", "target_index", "target_branch")},
           "valid": blank("valid", (len(units), slots))}
    if layout == "multi_answer":
        out.update(pair_chosen=blank("pair_chosen", (len(units), slots)),
                   pair_rejected=blank("pair_rejected", (len(units), slots)))
    for name, x in groups[0].fields.items() if groups and not sft else ():
        out[name] = np.zeros((len(units), slots, *x.shape[1:]), x.dtype)
    stats = {"truncated_answers": 0, "truncated_tokens": 0}
    for u, members in enumerate(units):
        start, branch = (0, 0), 0
        for s, i in enumerate(members):
            g = groups[i]
            if not sft:
                _check_pairs(g, i, max_pairs, max_answers if layout == "multi_answer" else len(g.answers))
                out["valid"][u, s * max_pairs:s * max_pairs + len(g.pairs)] = g.valid
                for name in groups[0].fields:
                    out[name][u, s * max_pairs:s * max_pairs + len(g.pairs)] = g.fields[name]
            elif g.valid:
                out["valid"][u, 0] = 1.0
            if sft:
                start = _pack_answer(out, u, start, s, i, g, max_answer_len, stats)
            elif layout == "multi_answer":
                start = _pack_group(out, u, start, s, i, g, branch, max_pairs, max_answer_len, stats)
                branch += len(g.answers)
            else:
                for j in range(max_pairs):
                    _pack_pair(out, u * max_pairs + j, i * max_pairs + j, g, j, layout, max_answer_len, stats)
    return Batch(**out, images=images or {}, pad_id=pad_id), stats


def _check_pairs(g: Group, i: int, max_pairs: int, max_answers: int) -> None:
    m = len(g.answers)
    if not 0 < m <= max_answers or not 0 < len(g.pairs) <= max_pairs:
        raise ValueError(f"group {i}: {m} answers and {len(g.pairs)} pairs (allowed: 1…{max_answers} "
                         f"answers, 1…{max_pairs} pairs)")
    if any(not (0 <= c < m and 0 <= x < m) or c == x for c, x in g.pairs):
        raise ValueError(f"group {i}: pairs {list(g.pairs)} must name two different answers of {m}")


def _pack_pair(out: dict, p: int, name: int, g: Group, j: int, layout: str, max_answer_len: int,
               stats: dict) -> None:
    """Pair slot j of a group as pair row p (shared_prefix) or rows 2p, 2p+1 (concat); an unused slot
    repeats the first pair cut to one token per answer."""
    c, x = g.pairs[j] if j < len(g.pairs) else g.pairs[0]
    chosen, rejected = g.answers[c], g.answers[x]
    if j >= len(g.pairs):
        chosen, rejected = chosen[:1], rejected[:1]
    seq_len, P = out["input_ids"].shape[1], len(g.prompt)
    if P == 0:
        raise PromptTooLongError(f"pair {name}: empty prompt (the first answer token needs a predecessor)")
    room = seq_len - P
    c, r = (min(len(a), max_answer_len, room) for a in (chosen, rejected))
    shared = layout == "shared_prefix"
    if shared and c + r > room:  # share the row: the shorter answer keeps what it can, up to half
        c = room - r if r <= room // 2 else c if c <= room // 2 else room // 2
        r = min(r, room - c)
    cut_c, cut_r = _truncate(chosen, c, stats), _truncate(rejected, r, stats)
    if not cut_c or not cut_r:
        raise PromptTooLongError(f"pair {name}: prompt of {P} tokens leaves {room} of {seq_len} for the answers "
                                 f"(chosen {len(chosen)}, rejected {len(rejected)} tokens)")
    if shared:
        _fill_row(out, p, g.prompt, [(CHOSEN, cut_c), (REJECTED, cut_r)], g.positions)
    else:
        _fill_row(out, 2 * p, g.prompt, [(CHOSEN, cut_c)], g.positions)
        _fill_row(out, 2 * p + 1, g.prompt, [(REJECTED, cut_r)], g.positions)


def _pack_group(out: dict, r: int, start: tuple[int, int], s: int, i: int, g: Group, branch: int, max_pairs: int,
                max_answer_len: int, stats: dict) -> tuple[int, int]:
    """Group i as segment s of multi-answer row r from `start`, its answers branches branch+1, …"""
    m, P = len(g.answers), len(g.prompt)
    room = out["input_ids"].shape[1] - start[0] - P
    if P == 0 or room < m:
        raise PromptTooLongError(f"group {i}: prompt of {P} tokens leaves {room} of {out['input_ids'].shape[1]} "
                                 f"for {m} answers")
    budgets = _share([min(len(a), max_answer_len) for a in g.answers], room)
    answers = [_truncate(a, n, stats) for a, n in zip(g.answers, budgets)]
    if not all(answers):
        raise PromptTooLongError(f"group {i}: an empty answer (each answer needs a token)")
    for j, (c, x) in enumerate(g.pairs):
        out["pair_chosen"][r, s * max_pairs + j] = branch + c + 1
        out["pair_rejected"][r, s * max_pairs + j] = branch + x + 1
    return _fill_row(out, r, g.prompt, [(branch + k + 1, a) for k, a in enumerate(answers)], g.positions, start, s)


def _pack_answer(out: dict, r: int, start: tuple[int, int], s: int, i: int, g: Group, max_answer_len: int,
                 stats: dict) -> tuple[int, int]:
    """SFT example i as segment s of row r from `start` (branch 1)."""
    room = out["input_ids"].shape[1] - start[0] - len(g.prompt)
    if not len(g.prompt) or room < 1:
        raise PromptTooLongError(f"example {i}: prompt of {len(g.prompt)} tokens does not fit "
                                 f"{out['input_ids'].shape[1] - start[0]}")
    answer = _truncate(g.answers[0], min(max_answer_len, room), stats)
    return _fill_row(out, r, g.prompt, [(CHOSEN, answer)], g.positions, start, s)


def plan_rows(lengths: Sequence[int], *, seq_len: int, rows: int, groups_per_row: int,
              weights: Sequence[int] | None = None, max_weight: int = 0) -> list[list[int]] | None:
    """Which groups share a row: first-fit decreasing of groups of these token lengths into `rows` rows of
    `seq_len` tokens, at most `groups_per_row` each (and, with `weights`, e.g. image patches, at most
    `max_weight` of them per row). Returns each row's group indexes in row order (the longest first; ties
    in input order, so a batch always packs the same way), or None if they do not fit."""
    weights = [0] * len(lengths) if weights is None else weights
    plan: list[list[int]] = [[] for _ in range(rows)]
    used, load = [0] * rows, [0] * rows
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r in range(rows) if used[r] + lengths[i] <= seq_len and len(plan[r]) < groups_per_row
                  and load[r] + weights[i] <= max(max_weight, weights[i])), None)
        if r is None:
            return None
        plan[r].append(i)
        used[r] += lengths[i]
        load[r] += weights[i]
    return plan


def rows_per_pair(layout: str) -> int:
    """Rows per pair (concat 2, shared_prefix 1); multi_answer rows hold groups: 1 row per group, whose
    per-pair arrays are [R, P, …]."""
    if layout not in LAYOUTS:
        raise ValueError(f"pair_layout {layout!r} is not one of {LAYOUTS}")
    return 2 if layout == "concat" else 1
