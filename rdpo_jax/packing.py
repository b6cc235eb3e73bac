"""Token layouts for preference pairs and SFT examples, and the log-likelihood gathers over them.

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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

LAYOUTS = ("shared_prefix", "concat", "multi_answer")
ROW_KEYS = ("input_ids", "positions", "branch_ids", "targets", "target_index", "target_branch")
# a DPO batch's per-pair rubric arrays float32[B, K] (K = data.max_criteria), which the rubric loss reads
RUBRIC_KEYS = ("chosen_scores", "rejected_scores", "criterion_weights", "criterion_mask", "essential_mask")
# a multi-answer batch's pairs per row: the answers' branches int32[R, P] (0 = no pair in that slot)
GROUP_KEYS = ("pair_chosen", "pair_rejected")
PAD_BRANCH, PROMPT, CHOSEN, REJECTED = -1, 0, 1, 2


class PromptTooLongError(ValueError):
    """A prompt (image tokens included) does not fit the row: prompts are never truncated."""


@dataclasses.dataclass(frozen=True)
class Pair:
    """Token ids of one preference pair (the prompt includes the image placeholder tokens)."""
    prompt: Sequence[int]
    chosen: Sequence[int]
    rejected: Sequence[int]
    positions: np.ndarray | None = None  # the prompt's M-RoPE positions int[3, P]; None = 0 … P−1


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


def _empty(rows: int, seq_len: int, answer_len: int, pad_id: int, mrope: bool) -> dict[str, np.ndarray]:
    answer_len = min(answer_len, seq_len - 1)  # a row holds at most seq_len − 1 answer tokens
    return {
        "input_ids": np.full((rows, seq_len), pad_id, np.int32),
        "positions": np.zeros((rows, 3, seq_len) if mrope else (rows, seq_len), np.int32),
        "branch_ids": np.full((rows, seq_len), PAD_BRANCH, np.int32),
        "targets": np.zeros((rows, answer_len), np.int32),
        "target_index": np.zeros((rows, answer_len), np.int32),
        "target_branch": np.zeros((rows, answer_len), np.int32),
    }


def pad_values(pad_id: int) -> dict[str, int]:
    """What a padding token holds in each per-token row array (every other batch array pads with 0)."""
    return {"input_ids": pad_id, "positions": 0, "branch_ids": PAD_BRANCH, "segment_ids": -1}


def pad_rows(batch: dict[str, np.ndarray], seq_len: int, pad_id: int = 0,
             target_len: int | None = None) -> dict[str, np.ndarray]:
    """A packed batch with its rows padded at the end to `seq_len` (as `_empty` pads: pad_id, position 0,
    branch −1) and its trained-token arrays to `target_len` (default: as they are; padding targets are
    branch 0). Returns `batch` if it already has both lengths."""
    T, A = batch["input_ids"].shape[1], batch["targets"].shape[1]
    target_len = A if target_len is None else target_len
    if seq_len < T or target_len < A:
        raise ValueError(f"cannot pad rows of {T} tokens and {A} targets to {seq_len} and {target_len}")
    if (seq_len, target_len) == (T, A):
        return batch
    fill = pad_values(pad_id)
    width = {k: seq_len - T if k in fill else target_len - A if k in ROW_KEYS else 0 for k in batch}
    return {k: np.pad(v, ((0, 0),) * (v.ndim - 1) + ((0, width[k]),), constant_values=fill.get(k, 0)) if width[k] else v
            for k, v in batch.items()}


@dataclasses.dataclass(frozen=True)
class Group:
    """One prompt with several answers and the preference pairs among them, (chosen, rejected) indexes
    into `answers`."""
    prompt: Sequence[int]
    answers: Sequence[Sequence[int]]
    pairs: Sequence[tuple[int, int]]
    positions: np.ndarray | None = None  # as `Pair.positions`


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


def _segment_rows(out: dict, rows, count: int, per_row: int, what: str) -> list:
    """The rows' record indexes (default: one record per row) checked against `per_row`; with `rows`
    given, `out` gets `segment_ids` (−1 padding) for records sharing rows."""
    if rows is None:
        return [[i] for i in range(count)]
    if any(len(r) > per_row for r in rows):
        raise ValueError(f"rows of {max(map(len, rows))} {what}, more than {what}_per_row={per_row}")
    out["segment_ids"] = np.full(out["input_ids"].shape, -1, np.int32)
    return rows


def _truncate(answer: Sequence[int], budget: int, stats: dict) -> list[int]:
    answer = list(answer)
    if len(answer) > budget:
        stats["truncated_answers"] += 1
        stats["truncated_tokens"] += len(answer) - budget
        answer = answer[:budget]
    return answer


def pack_pairs(pairs: Sequence[Pair], *, layout: str, seq_len: int, max_answer_len: int, pad_id: int = 0,
               mrope: bool = False) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Packs B pairs into the chosen layout (host side, numpy).

    Row length `seq_len` must hold prompt + chosen + rejected (shared_prefix) or prompt + the longer
    answer (concat) once each answer is cut to `max_answer_len` tokens (at its end, counted in stats).

    Returns:
      (batch, stats). batch: input_ids, positions, branch_ids int32[R, seq_len] (positions int32[R, 3,
      seq_len] with `mrope`, the prompts' from `Pair.positions`); targets, target_index,
      target_branch int32[R, A] with R = B (shared_prefix, multi_answer) or 2B (concat), A = 2·max_answer_len
      resp. max_answer_len, at most seq_len − 1 (the most answer tokens a row holds: the LM head's width
      follows the bucket); multi_answer adds `pack_groups`' pair arrays (one pair per row). stats:
      truncated_answers, truncated_tokens.

    Raises:
      PromptTooLongError: a prompt leaves no room for its answers (naming the pair).
    """
    if layout == "multi_answer":  # each pair a group of its two answers
        groups = [Group(p.prompt, [p.chosen, p.rejected], [(0, 1)], p.positions) for p in pairs]
        return pack_groups(groups, seq_len=seq_len, max_answer_len=max_answer_len, max_answers=2, max_pairs=1,
                           pad_id=pad_id, mrope=mrope)
    B = len(pairs)
    shared = rows_per_pair(layout) == 1
    stats = {"truncated_answers": 0, "truncated_tokens": 0}
    answer_len = 2 * max_answer_len if shared else max_answer_len
    out = _empty(B if shared else 2 * B, seq_len, answer_len, pad_id, mrope)
    for i, pair in enumerate(pairs):
        P = len(pair.prompt)
        if P == 0:
            raise PromptTooLongError(f"pair {i}: empty prompt (the first answer token needs a predecessor)")
        room = seq_len - P
        c, r = (min(len(a), max_answer_len, room) for a in (pair.chosen, pair.rejected))
        if shared and c + r > room:  # share the row: the shorter answer keeps what it can, up to half
            c = room - r if r <= room // 2 else c if c <= room // 2 else room // 2
            r = min(r, room - c)
        chosen, rejected = _truncate(pair.chosen, c, stats), _truncate(pair.rejected, r, stats)
        if not chosen or not rejected:
            raise PromptTooLongError(
                f"pair {i}: prompt of {P} tokens leaves {room} of {seq_len} for the answers "
                f"(chosen {len(pair.chosen)}, rejected {len(pair.rejected)} tokens)")
        if shared:
            _fill_row(out, i, pair.prompt, [(CHOSEN, chosen), (REJECTED, rejected)], pair.positions)
        else:
            _fill_row(out, 2 * i, pair.prompt, [(CHOSEN, chosen)], pair.positions)
            _fill_row(out, 2 * i + 1, pair.prompt, [(REJECTED, rejected)], pair.positions)
    return out, stats


def pack_groups(groups: Sequence[Group], *, seq_len: int, max_answer_len: int, max_answers: int, max_pairs: int,
                pad_id: int = 0, mrope: bool = False, rows: Sequence[Sequence[int]] | None = None,
                groups_per_row: int = 1) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Packs prompt groups as multi-answer rows `[prompt][a1]…[am]` (host side, numpy), one group per row,
    or several one after another (`rows`: the groups of each row, at most `groups_per_row`; see
    `plan_rows`), each its own segment: positions restart at 0 and nothing attends across segments.

    Each answer is cut to `max_answer_len` tokens, and all of a group's answers to the room its row leaves
    (`_share`: the shorter whole, the longer to equal shares), counted in stats. A group has at most
    `max_answers` answers and `max_pairs` pairs.

    Returns:
      (batch, stats): the row keys as in `pack_pairs` (with `rows`, also `segment_ids` int32[R, seq_len],
      −1 padding), with R = len(rows) (default len(groups)) and A = groups_per_row · max_answers · max_answer_len (at
      most seq_len − 1); pair_chosen, pair_rejected int32[R, groups_per_row · max_pairs] (branches, 0 in
      unused slots): segment s of a row holds pair slots [s·max_pairs, (s+1)·max_pairs), and its answers
      the branches after those of the segments before it.

    Raises:
      PromptTooLongError: a prompt leaves less than a token per answer; ValueError: a group breaks a limit
      or a pair names an answer it does not have.
    """
    stats = {"truncated_answers": 0, "truncated_tokens": 0}
    out = _empty(len(groups) if rows is None else len(rows), seq_len, groups_per_row * max_answers * max_answer_len,
                 pad_id, mrope)
    rows = _segment_rows(out, rows, len(groups), groups_per_row, "groups")
    slots = groups_per_row * max_pairs
    out["pair_chosen"] = np.zeros((len(rows), slots), np.int32)
    out["pair_rejected"] = np.zeros((len(rows), slots), np.int32)
    for r, members in enumerate(rows):
        start, branch = (0, 0), 0
        for s, i in enumerate(members):
            g = groups[i]
            m, P = len(g.answers), len(g.prompt)
            if not 0 < m <= max_answers or not 0 < len(g.pairs) <= max_pairs:
                raise ValueError(f"group {i}: {m} answers and {len(g.pairs)} pairs (allowed: 1…{max_answers} "
                                 f"answers, 1…{max_pairs} pairs)")
            if any(not (0 <= c < m and 0 <= x < m) or c == x for c, x in g.pairs):
                raise ValueError(f"group {i}: pairs {list(g.pairs)} must name two different answers of {m}")
            room = seq_len - start[0] - P
            if P == 0 or room < m:
                raise PromptTooLongError(f"group {i}: prompt of {P} tokens leaves {room} of {seq_len} for {m} answers")
            budgets = _share([min(len(a), max_answer_len) for a in g.answers], room)
            answers = [_truncate(a, n, stats) for a, n in zip(g.answers, budgets)]
            if not all(answers):
                raise PromptTooLongError(f"group {i}: an empty answer (each answer needs a token)")
            start = _fill_row(out, r, g.prompt, [(branch + k + 1, a) for k, a in enumerate(answers)], g.positions,
                              start, s)
            for j, (c, x) in enumerate(g.pairs):
                out["pair_chosen"][r, s * max_pairs + j] = branch + c + 1
                out["pair_rejected"][r, s * max_pairs + j] = branch + x + 1
            branch += m
    return out, stats


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


def pack_sft(examples: Sequence[tuple], *, seq_len: int, max_answer_len: int, pad_id: int = 0,
             mrope: bool = False, rows: Sequence[Sequence[int]] | None = None,
             examples_per_row: int = 1) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Packs (prompt, answer) or (prompt, answer, prompt positions) examples as `[prompt][answer]` rows
    (branch 1); see `pack_pairs`. With `rows` (each row's examples, at most `examples_per_row`, as
    `plan_rows` gives them) several examples share a row as segments, as in `pack_groups`, and the batch
    has `segment_ids`; the trained-token width is then examples_per_row · max_answer_len (≤ seq_len − 1)."""
    stats = {"truncated_answers": 0, "truncated_tokens": 0}
    out = _empty(len(examples) if rows is None else len(rows), seq_len, examples_per_row * max_answer_len, pad_id,
                 mrope)
    rows = _segment_rows(out, rows, len(examples), examples_per_row, "examples")
    for r, members in enumerate(rows):
        start = (0, 0)
        for s, i in enumerate(members):
            prompt, answer, *positions = examples[i]
            room = seq_len - start[0] - len(prompt)
            if not len(prompt) or room < 1:
                raise PromptTooLongError(f"example {i}: prompt of {len(prompt)} tokens does not fit "
                                         f"{seq_len - start[0]}")
            answer = _truncate(answer, min(max_answer_len, room), stats)
            start = _fill_row(out, r, prompt, [(CHOSEN, answer)], positions[0] if positions else None, start, s)
    return out, stats


def rows_per_pair(layout: str) -> int:
    """Rows per pair (concat 2, shared_prefix 1); multi_answer rows hold groups: 1 row per group, whose
    per-pair arrays are [R, P, …]."""
    if layout not in LAYOUTS:
        raise ValueError(f"pair_layout {layout!r} is not one of {LAYOUTS}")
    return 2 if layout == "concat" else 1


# ----- inside jit -----

def attention_mask(branch_ids: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """bool[R, T, T] from branch ids int32[R, T] (the mask in the module docstring) and, for rows packing
    several groups, their segment ids int32[R, T] (no attention across segments)."""
    T = branch_ids.shape[1]
    valid = branch_ids >= 0
    causal = jnp.tril(jnp.ones((T, T), bool))[None]
    q, k = branch_ids[:, :, None], branch_ids[:, None, :]
    mask = causal & valid[:, :, None] & (k >= 0) & ((k == PROMPT) | (k == q))
    if segment_ids is not None:
        mask &= segment_ids[:, :, None] == segment_ids[:, None, :]
    return mask


def token_logps(model, batch: dict, features=None) -> jax.Array:
    """Log-probabilities float32[R, A] of the target tokens (0 at padding), from one forward per row.

    `features`: the rows' image features (`model.image_features`), one entry per row; default: those of
    the batch's images (`model.images_of(batch)`).
    """
    if features is None:
        images = model.images_of(batch)
        features = None if images is None else model.image_features(images)
    mask = attention_mask(batch["branch_ids"], batch.get("segment_ids"))
    hidden = model.hidden_states(batch["input_ids"], features, mask, batch["positions"])
    hidden = jnp.take_along_axis(hidden, batch["target_index"][..., None], axis=1)  # [R, A, D]
    logps = model.target_logps(hidden, batch["targets"])  # the head in vocabulary chunks
    return jnp.where(batch["target_branch"] > 0, logps, 0.0)


def pair_logps(model, batch: dict, *, layout: str) -> dict[str, jax.Array]:
    """Summed log-likelihoods and token counts of both answers of B pairs, float32[B] each.

    The batch's images (one entry per pair) are encoded once per pair; the concat layout reuses a pair's
    features for both its rows.
    """
    if layout == "multi_answer":
        return _group_pair_logps(model, batch)
    copies = rows_per_pair(layout)
    images = model.images_of(batch)
    features = None if images is None else model.image_features(images)
    rows = batch["input_ids"].shape[0]
    if features is not None and rows > len(features[1]):  # a record's rows (its pairs, their copies) are adjacent
        features = jax.tree.map(lambda x: jnp.repeat(x, rows // len(features[1]), axis=0), features)
    logps = token_logps(model, batch, features)
    branch = batch["target_branch"]

    def per_pair(x):  # rows -> pairs: concat rows 2i and 2i+1 belong to pair i
        return x.reshape(-1, copies).sum(1)

    return {
        "chosen_logp": per_pair(jnp.where(branch == CHOSEN, logps, 0.0).sum(-1)),
        "rejected_logp": per_pair(jnp.where(branch == REJECTED, logps, 0.0).sum(-1)),
        "chosen_count": per_pair((branch == CHOSEN).sum(-1).astype(jnp.float32)),
        "rejected_count": per_pair((branch == REJECTED).sum(-1).astype(jnp.float32)),
    }


def _group_pair_logps(model, batch: dict) -> dict[str, jax.Array]:
    """`pair_logps` of multi-answer rows: float32[R·P] each, pair slot p of row r at r·P + p (0 for an
    unused slot)."""
    logps = token_logps(model, batch)  # [R, A]
    branch = batch["target_branch"][:, None, :]  # [R, 1, A]

    def per_pair(key):
        hit = (branch == batch[key][..., None]) & (batch[key][..., None] > 0)  # [R, P, A]
        return (jnp.where(hit, logps[:, None], 0.0).sum(-1).reshape(-1),
                hit.sum(-1).astype(jnp.float32).reshape(-1))

    (c, cc), (r, rc) = per_pair("pair_chosen"), per_pair("pair_rejected")
    return {"chosen_logp": c, "rejected_logp": r, "chosen_count": cc, "rejected_count": rc}
