"""The in-jit half of the pair layouts (`packing.py` is the host half): the attention mask of a packed
row, and the log-likelihoods of its answers from one forward per row, gathered at the trained tokens
only (A ≪ T positions go through the LM head).

    mask(q, k) = valid(q) ∧ valid(k) ∧ k ≤ q ∧ (branch(k) = 0 ∨ branch(k) = branch(q)) ∧ segment(q) = segment(k)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rdpo_jax.batch import Batch
from rdpo_jax.packing import CHOSEN, PROMPT, REJECTED, rows_per_pair


def attention_mask(branch_ids: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """bool[R, T, T] from branch ids int32[R, T] (the mask above) and, for rows packing several groups,
    their segment ids int32[R, T] (no attention across segments)."""
    T = branch_ids.shape[1]
    valid = branch_ids >= 0
    causal = jnp.tril(jnp.ones((T, T), bool))[None]
    q, k = branch_ids[:, :, None], branch_ids[:, None, :]
    mask = causal & valid[:, :, None] & (k >= 0) & ((k == PROMPT) | (k == q))
    if segment_ids is not None:
        mask &= segment_ids[:, :, None] == segment_ids[:, None, :]
    return mask


def token_logps(model, batch: Batch, features=None) -> jax.Array:
    """Log-probabilities float32[R, A] of the target tokens (0 at padding), from one forward per row.

    `features`: the rows' image features (`model.image_features`), one entry per row; default: those of
    the batch's images (`model.images_of(batch.images)`).
    """
    if features is None:
        images = model.images_of(batch.images)
        features = None if images is None else model.image_features(images)
    mask = attention_mask(batch.branch_ids, batch.segment_ids)
    hidden = model.hidden_states(batch.input_ids, features, mask, batch.positions)
    hidden = jnp.take_along_axis(hidden, batch.target_index[..., None], axis=1)  # [R, A, D]
    logps = model.target_logps(hidden, batch.targets)  # the head in vocabulary chunks
    return jnp.where(batch.target_branch > 0, logps, 0.0)


def pair_logps(model, batch: Batch, *, layout: str) -> dict[str, jax.Array]:
    """Summed log-likelihoods and token counts of both answers of every pair slot, float32[U·P] each (slot
    p of unit u at u·P + p; 0 for an unused multi-answer slot).

    The batch's images (one entry per unit) are encoded once per unit; its P pair rows (concat: 2P)
    reuse the features.
    """
    if layout == "multi_answer":
        return _group_pair_logps(model, batch)
    copies = rows_per_pair(layout)
    images = model.images_of(batch.images)
    features = None if images is None else model.image_features(images)
    rows = batch.input_ids.shape[0]
    if features is not None and rows > len(features.counts):  # a unit's rows (its pairs, their copies) are adjacent
        features = jax.tree.map(lambda x: jnp.repeat(x, rows // len(features.counts), axis=0), features)
    logps = token_logps(model, batch, features)
    branch = batch.target_branch

    def per_pair(x):  # rows -> pairs: concat rows 2i and 2i+1 belong to pair i
        return x.reshape(-1, copies).sum(1)

    return {
        "chosen_logp": per_pair(jnp.where(branch == CHOSEN, logps, 0.0).sum(-1)),
        "rejected_logp": per_pair(jnp.where(branch == REJECTED, logps, 0.0).sum(-1)),
        "chosen_count": per_pair((branch == CHOSEN).sum(-1).astype(jnp.float32)),
        "rejected_count": per_pair((branch == REJECTED).sum(-1).astype(jnp.float32)),
    }


def _group_pair_logps(model, batch: Batch) -> dict[str, jax.Array]:
    """`pair_logps` of multi-answer rows (a unit is a row): the pairs name their answers' branches."""
    logps = token_logps(model, batch)  # [R, A]
    branch = batch.target_branch[:, None, :]  # [R, 1, A]

    def per_pair(pairs):
        hit = (branch == pairs[..., None]) & (pairs[..., None] > 0)  # [R, P, A]
        return (jnp.where(hit, logps[:, None], 0.0).sum(-1).reshape(-1),
                hit.sum(-1).astype(jnp.float32).reshape(-1))

    (c, cc), (r, rc) = per_pair(batch.pair_chosen), per_pair(batch.pair_rejected)
    return {"chosen_logp": c, "rejected_logp": r, "chosen_count": cc, "rejected_count": rc}
