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
`qwen_vl_positions.rope_index` gives them (`Pair.positions`), and every answer counting on from the
prompt's largest position + 1 on all three rows (in the shared-prefix row both answers start there, as
two separate forwards would); 1D positions are the case where the prompt counts 0 … P−1.

Every layout names its trained tokens the same way: `targets` int32[R, A] (the answer tokens),
`target_index` int32[R, A] (the row index whose hidden state predicts that token: the previous token of
the same branch, the last prompt token for an answer's first token) and `target_branch` int32[R, A]
(1 chosen/answer, 2 rejected, 0 padding). Only those A ≪ T positions go through the LM head.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

LAYOUTS = ("shared_prefix", "concat")
ROW_KEYS = ("input_ids", "positions", "branch_ids", "targets", "target_index", "target_branch")
# a DPO batch's per-pair rubric arrays float32[B, K] (K = data.max_criteria), which the rubric loss reads
RUBRIC_KEYS = ("chosen_scores", "rejected_scores", "criterion_weights", "criterion_mask", "essential_mask")
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


def _fill_row(out: dict, r: int, prompt, answers: Sequence[tuple[int, Sequence[int]]], positions=None):
    """Writes one row: the prompt, then each (branch, answer) restarting positions after the prompt."""
    P = len(prompt)
    positions = np.arange(P) if positions is None else np.asarray(positions)
    if positions.shape[-1] != P or positions.ndim > out["positions"].ndim - 1:
        raise ValueError(f"prompt positions of shape {positions.shape} for a prompt of {P} tokens in rows of "
                         f"positions {out['positions'].shape[1:]}")
    start = int(positions.max()) + 1
    out["input_ids"][r, :P] = prompt
    out["positions"][r, ..., :P] = positions
    out["branch_ids"][r, :P] = PROMPT
    t, a = P, 0
    for branch, answer in answers:
        n = len(answer)
        out["input_ids"][r, t:t + n] = answer
        out["positions"][r, ..., t:t + n] = np.arange(start, start + n)
        out["branch_ids"][r, t:t + n] = branch
        out["targets"][r, a:a + n] = answer
        out["target_index"][r, a:a + n] = [P - 1] + list(range(t, t + n - 1))
        out["target_branch"][r, a:a + n] = branch
        t, a = t + n, a + n


def _empty(rows: int, seq_len: int, answer_len: int, pad_id: int, mrope: bool) -> dict[str, np.ndarray]:
    return {
        "input_ids": np.full((rows, seq_len), pad_id, np.int32),
        "positions": np.zeros((rows, 3, seq_len) if mrope else (rows, seq_len), np.int32),
        "branch_ids": np.full((rows, seq_len), PAD_BRANCH, np.int32),
        "targets": np.zeros((rows, answer_len), np.int32),
        "target_index": np.zeros((rows, answer_len), np.int32),
        "target_branch": np.zeros((rows, answer_len), np.int32),
    }


def pad_rows(batch: dict[str, np.ndarray], seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """A packed batch with its rows padded at the end to `seq_len` (as `_empty` pads: pad_id, position 0,
    branch −1); the trained-token arrays do not depend on the row length. Returns `batch` if it fits."""
    T = batch["input_ids"].shape[1]
    if seq_len < T:
        raise ValueError(f"cannot pad rows of {T} tokens to {seq_len}")
    if seq_len == T:
        return batch
    fill = {"input_ids": pad_id, "positions": 0, "branch_ids": PAD_BRANCH}
    return {k: np.pad(v, ((0, 0),) * (v.ndim - 1) + ((0, seq_len - T),), constant_values=fill[k]) if k in fill else v
            for k, v in batch.items()}


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
      target_branch int32[R, A] with R = B (shared_prefix) or 2B (concat), A = 2·max_answer_len resp.
      max_answer_len. stats: truncated_answers, truncated_tokens.

    Raises:
      PromptTooLongError: a prompt leaves no room for its answers (naming the pair).
    """
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


def pack_sft(examples: Sequence[tuple], *, seq_len: int, max_answer_len: int, pad_id: int = 0,
             mrope: bool = False) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Packs (prompt, answer) or (prompt, answer, prompt positions) examples as `[prompt][answer]` rows
    (branch 1); see `pack_pairs`."""
    stats = {"truncated_answers": 0, "truncated_tokens": 0}
    out = _empty(len(examples), seq_len, max_answer_len, pad_id, mrope)
    for i, (prompt, answer, *positions) in enumerate(examples):
        if not 0 < len(prompt) < seq_len:
            raise PromptTooLongError(f"example {i}: prompt of {len(prompt)} tokens does not fit {seq_len}")
        answer = _truncate(answer, min(max_answer_len, seq_len - len(prompt)), stats)
        _fill_row(out, i, prompt, [(CHOSEN, answer)], positions[0] if positions else None)
    return out, stats


def rows_per_pair(layout: str) -> int:
    if layout not in LAYOUTS:
        raise ValueError(f"pair_layout {layout!r} is not one of {LAYOUTS}")
    return 1 if layout == "shared_prefix" else 2


# ----- inside jit -----

def attention_mask(branch_ids: jax.Array) -> jax.Array:
    """bool[R, T, T] from branch ids int32[R, T] (the mask in the module docstring)."""
    T = branch_ids.shape[1]
    valid = branch_ids >= 0
    causal = jnp.tril(jnp.ones((T, T), bool))[None]
    cross = (branch_ids[:, :, None] == REJECTED) & (branch_ids[:, None, :] == CHOSEN)
    return causal & valid[:, :, None] & valid[:, None, :] & ~cross


def token_logps(model, batch: dict, features=None) -> jax.Array:
    """Log-probabilities float32[R, A] of the target tokens (0 at padding), from one forward per row.

    `features`: the rows' image features (`model.image_features`), one entry per row; default: those of
    the batch's images (`model.images_of(batch)`).
    """
    if features is None:
        images = model.images_of(batch)
        features = None if images is None else model.image_features(images)
    mask = attention_mask(batch["branch_ids"])
    hidden = model.hidden_states(batch["input_ids"], features, mask, batch["positions"])
    hidden = jnp.take_along_axis(hidden, batch["target_index"][..., None], axis=1)  # [R, A, D]
    logits = model.logits(hidden)  # float32[R, A, V]
    picked = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    logps = picked - jax.nn.logsumexp(logits, axis=-1)
    return jnp.where(batch["target_branch"] > 0, logps, 0.0)


def pair_logps(model, batch: dict, *, layout: str) -> dict[str, jax.Array]:
    """Summed log-likelihoods and token counts of both answers of B pairs, float32[B] each.

    The batch's images (one entry per pair) are encoded once per pair; the concat layout reuses a pair's
    features for both its rows.
    """
    copies = rows_per_pair(layout)
    images = model.images_of(batch)
    features = None if images is None else model.image_features(images)
    if features is not None and copies == 2:
        features = jax.tree.map(lambda x: jnp.repeat(x, 2, axis=0), features)
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
