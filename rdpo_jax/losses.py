"""Preference losses (DPO family and the rubric loss of rDPO) and the SFT loss.

Per pair i, with policy log-likelihoods ℓw, ℓl of the chosen / rejected answer and reference ones
rw, rl (summed, or length-normalized by the caller):

    h = (ℓw − rw) − (ℓl − rl)        z = β·h

    sigmoid   −log σ(z)                                            (DPO, Rafailov et al. 2023)
    cdpo      −(1−ε) log σ(z) − ε log σ(−z)                         (conservative DPO, label smoothing ε)
    robust    (−(1−ε) log σ(z) + ε log σ(−z)) / (1−2ε)              (Chowdhury et al. 2024)
    ipo       (h − 1/(2β))²                                         (Azar et al. 2023; length-normalized ℓ)
    hinge     max(0, 1 − z)                                         (SLiC-style)
    rubric    Σ_k ω_k·(−log σ(y_k·z − γ|δ_k|)) / Σ_k ω_k             (rDPO)
              δ_k = sw_k − sl_k, y_k = sign δ_k, ω_k = m_k·w_k·|δ_k|

Rubric shapes: K criteria per pair, padded; m_k the criterion mask, w_k > 0 the criterion weight (the
caller folds in essential/additional weights), scores in [0, 1]. A pair whose criteria all tie has
Σω = 0: its loss is 0 and `rubric/tied` flags it.

Criterion kinds enter through `essential_mask` (1 = essential, 0 = additional), used only for the
agreement metrics: the ω-weighted share of non-tied essential (additional) criteria whose sign agrees
with z. A pair with no such criterion has NaN there; reduce these metrics with a NaN-aware mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOSS_TYPES = ("sigmoid", "cdpo", "robust", "ipo", "hinge", "rubric")


def preference_loss(
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    ref_chosen: jax.Array,
    ref_rejected: jax.Array,
    *,
    loss_type: str,
    beta: float,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    chosen_scores: jax.Array | None = None,
    rejected_scores: jax.Array | None = None,
    criterion_weights: jax.Array | None = None,
    criterion_mask: jax.Array | None = None,
    essential_mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-pair preference loss and per-pair metrics.

    Args:
      policy_chosen, policy_rejected, ref_chosen, ref_rejected: float32[B] log-likelihoods (`ipo` expects
        length-normalized ones, i.e. token means).
      loss_type, beta, label_smoothing, gamma: a `train_step.DPOSettings`' fields (checked there):
        one of `LOSS_TYPES`; the inverse temperature β > 0; ε of `cdpo` and `robust` (0 ≤ ε < 0.5);
        the per-criterion margin γ ≥ 0 of `rubric`.
      chosen_scores, rejected_scores: float32[B, K] criterion scores in [0, 1] (required by `rubric`;
        when given to any type, the rubric metrics are reported).
      criterion_weights: float32[B, K] weights w_k > 0 (default 1).
      criterion_mask: float32[B, K], 1 for real criteria, 0 for padding (default all 1).
      essential_mask: float32[B, K], 1 for essential criteria, 0 for additional ones (optional; enables
        `rubric/essential_agreement` and `rubric/additional_agreement`).

    Returns:
      (loss float32[B], metrics dict of float32[B]) — metric names follow TRL (`rewards/chosen`, …).
    """
    if loss_type == "rubric" and (chosen_scores is None or rejected_scores is None):
        raise ValueError("loss_type 'rubric' needs chosen_scores and rejected_scores (float32[B, K])")

    chosen_reward = policy_chosen - ref_chosen
    rejected_reward = policy_rejected - ref_rejected
    h = chosen_reward - rejected_reward
    z = beta * h
    eps = label_smoothing
    metrics = {
        "rewards/chosen": beta * chosen_reward,
        "rewards/rejected": beta * rejected_reward,
        "rewards/margins": z,
        "rewards/accuracies": (z > 0).astype(jnp.float32),
        "logps/chosen": policy_chosen,
        "logps/rejected": policy_rejected,
    }

    if chosen_scores is not None:
        delta = (chosen_scores - rejected_scores).astype(jnp.float32)
        mask = jnp.ones_like(delta) if criterion_mask is None else criterion_mask.astype(jnp.float32)
        weight = jnp.ones_like(delta) if criterion_weights is None else criterion_weights.astype(jnp.float32)
        omega = mask * weight * jnp.abs(delta)
        total = omega.sum(-1)
        tied = total <= 0
        metrics["rubric/tied"] = tied.astype(jnp.float32)
        sign = jnp.sign(delta)
        if essential_mask is not None:
            agrees = (sign * z[:, None] > 0).astype(jnp.float32)
            for name, kind in (("essential", essential_mask), ("additional", 1 - essential_mask)):
                w = omega * kind
                metrics[f"rubric/{name}_agreement"] = (w * agrees).sum(-1) / w.sum(-1)  # NaN if none

    if loss_type == "sigmoid":
        loss = -jax.nn.log_sigmoid(z)
    elif loss_type == "cdpo":
        loss = -(1 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)
    elif loss_type == "robust":
        loss = (-(1 - eps) * jax.nn.log_sigmoid(z) + eps * jax.nn.log_sigmoid(-z)) / (1 - 2 * eps)
    elif loss_type == "ipo":
        loss = jnp.square(h - 1 / (2 * beta))
    elif loss_type == "hinge":
        loss = jax.nn.relu(1 - z)
    else:  # rubric
        per_criterion = -jax.nn.log_sigmoid(sign * z[:, None] - gamma * jnp.abs(delta))
        loss = (omega * per_criterion).sum(-1) / jnp.where(tied, 1.0, total)
    return loss, metrics


def token_nll(logps_sum: jax.Array, counts: jax.Array) -> jax.Array:
    """Mean negative log-likelihood per token of each sequence: float32[B] (0 for empty sequences)."""
    return -logps_sum / jnp.maximum(counts, 1)
