"""Every loss type against an independent numpy implementation of its published formula.

Sources of the formulas:
  sigmoid  Rafailov et al. 2023, "Direct Preference Optimization", eq. 7: −log σ(β·h).
  cdpo     Mitchell 2023, "A note on DPO with noisy preferences" (conservative DPO):
           −(1−ε) log σ(βh) − ε log σ(−βh).
  robust   Chowdhury et al. 2024, "Provably Robust DPO", eq. 8: ((1−ε)(−log σ(βh)) − ε(−log σ(−βh)))/(1−2ε).
  ipo      Azar et al. 2023, "A General Theoretical Paradigm…", eq. 17: (h − 1/(2τ))², τ = β.
  hinge    Zhao et al. 2023, "SLiC-HF": max(0, 1 − βh).
  rubric   DESIGN.md (rDPO): Σ_k ω_k·(−log σ(y_k·βh − γ|δ_k|)) / Σ_k ω_k, ω_k = m_k·w_k·|δ_k|, y_k = sign δ_k.
where h = (ℓw − rw) − (ℓl − rl).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rdpo_jax import losses, train_step

B, K = 6, 5


def _np_logsig(x):
    return -np.logaddexp(0.0, -x)  # log σ(x), stable


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    logps = [rng.normal(-20, 5, B).astype(np.float32) for _ in range(4)]
    cs = rng.integers(0, 2, (B, K)).astype(np.float32)
    rs = rng.integers(0, 2, (B, K)).astype(np.float32)
    cs[0], rs[0] = 1, 0  # pair 0: every criterion favours chosen
    cs[1] = rs[1]  # pair 1: all criteria tie
    cs[2, :2], rs[2, :2] = 0.75, 0.25  # graded (1–5 scale mapped to [0, 1]) scores
    w = rng.uniform(0.5, 2.0, (B, K)).astype(np.float32)
    m = np.ones((B, K), np.float32)
    m[3, 3:] = 0  # pair 3 has only 3 real criteria
    ess = np.zeros((B, K), np.float32)
    ess[:, :2] = 1
    return logps, cs, rs, w, m, ess


def _h(logps):
    pc, pr, rc, rr = (x.astype(np.float64) for x in logps)
    return (pc - rc) - (pr - rr)


def _reference(loss_type, logps, beta, eps=0.0, gamma=0.0, cs=None, rs=None, w=None, m=None):
    h = _h(logps)
    z = beta * h
    if loss_type == "sigmoid":
        return -_np_logsig(z)
    if loss_type == "cdpo":
        return -(1 - eps) * _np_logsig(z) - eps * _np_logsig(-z)
    if loss_type == "robust":
        return ((1 - eps) * -_np_logsig(z) - eps * -_np_logsig(-z)) / (1 - 2 * eps)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return np.maximum(0.0, 1 - z)
    out = np.zeros(B)
    for i in range(B):
        num = den = 0.0
        for k in range(K):
            d = float(cs[i, k]) - float(rs[i, k])
            omega = m[i, k] * w[i, k] * abs(d)
            num += omega * -_np_logsig(np.sign(d) * z[i] - gamma * abs(d))
            den += omega
        out[i] = num / den if den > 0 else 0.0
    return out


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("cdpo", 0.1), ("cdpo", 0.0), ("robust", 0.2),
                                           ("ipo", 0.0), ("hinge", 0.0)])
def test_dpo_family_matches_formula(loss_type, eps):
    logps, *_ = _inputs()
    loss, metrics = losses.preference_loss(*map(jnp.asarray, logps), loss_type=loss_type, beta=0.1,
                                           label_smoothing=eps)
    np.testing.assert_allclose(loss, _reference(loss_type, logps, 0.1, eps), rtol=1e-5, atol=1e-6)
    pc, pr, rc, rr = logps
    np.testing.assert_allclose(metrics["rewards/chosen"], 0.1 * (pc - rc), rtol=1e-5)
    np.testing.assert_allclose(metrics["rewards/rejected"], 0.1 * (pr - rr), rtol=1e-5)
    np.testing.assert_allclose(metrics["rewards/margins"], 0.1 * _h(logps), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(metrics["rewards/accuracies"], (_h(logps) > 0).astype(np.float32))
    np.testing.assert_array_equal(metrics["logps/chosen"], pc)
    np.testing.assert_array_equal(metrics["logps/rejected"], pr)
    assert "rubric/tied" not in metrics


@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_rubric_matches_formula_with_ties_masks_and_gamma(gamma):
    logps, cs, rs, w, m, ess = _inputs(1)
    loss, metrics = losses.preference_loss(
        *map(jnp.asarray, logps), loss_type="rubric", beta=0.2, gamma=gamma, chosen_scores=cs,
        rejected_scores=rs, criterion_weights=w, criterion_mask=m, essential_mask=ess)
    np.testing.assert_allclose(loss, _reference("rubric", logps, 0.2, gamma=gamma, cs=cs, rs=rs, w=w, m=m),
                               rtol=1e-5, atol=1e-6)
    assert loss[1] == 0 and metrics["rubric/tied"][1] == 1 and metrics["rubric/tied"].sum() == 1
    # agreement: ω-weighted share of non-tied essential criteria whose sign matches z
    z = 0.2 * _h(logps)
    for i in range(B):
        d = cs[i] - rs[i]
        omega = m[i] * w[i] * np.abs(d)
        agree = (np.sign(d) * z[i] > 0)
        for name, kind in (("essential", ess[i]), ("additional", 1 - ess[i])):
            den = (omega * kind).sum()
            got = float(metrics[f"rubric/{name}_agreement"][i])
            if den == 0:
                assert np.isnan(got)
            else:
                assert got == pytest.approx((omega * kind * agree).sum() / den, rel=1e-5)


def test_rubric_mask_removes_criteria():
    logps, cs, rs, w, m, _ = _inputs(2)
    rs[4, 3:] = 1 - cs[4, 3:]  # pair 4: strong disagreement on the last two criteria …
    m[4, 3:] = 0  # … which are padding
    masked, _ = losses.preference_loss(*map(jnp.asarray, logps), loss_type="rubric", beta=0.1, chosen_scores=cs,
                                       rejected_scores=rs, criterion_weights=w, criterion_mask=m)
    trimmed, _ = losses.preference_loss(*(jnp.asarray(x[4:5]) for x in logps), loss_type="rubric", beta=0.1,
                                        chosen_scores=cs[4:5, :3], rejected_scores=rs[4:5, :3],
                                        criterion_weights=w[4:5, :3])
    np.testing.assert_allclose(masked[4], trimmed[0], rtol=1e-6)


def test_rubric_equals_sigmoid_when_all_criteria_favour_chosen():
    logps, *_ = _inputs(3)
    rng = np.random.default_rng(3)
    cs = rng.uniform(0.6, 1.0, (B, K)).astype(np.float32)
    rs = rng.uniform(0.0, 0.4, (B, K)).astype(np.float32)
    rubric, _ = losses.preference_loss(*map(jnp.asarray, logps), loss_type="rubric", beta=0.3, chosen_scores=cs,
                                       rejected_scores=rs, criterion_weights=rng.uniform(0.1, 3, (B, K)))
    sigmoid, _ = losses.preference_loss(*map(jnp.asarray, logps), loss_type="sigmoid", beta=0.3)
    np.testing.assert_allclose(rubric, sigmoid, rtol=1e-6)


def test_rubric_gradient_matches_finite_differences():
    logps, cs, rs, w, m, _ = _inputs(4)
    with jax.enable_x64(True):
        args = [jnp.asarray(x, jnp.float64) for x in logps]

        def total(pc):
            loss, _ = losses.preference_loss(pc, *args[1:], loss_type="rubric", beta=0.5, gamma=0.3,
                                             chosen_scores=jnp.asarray(cs, jnp.float64),
                                             rejected_scores=jnp.asarray(rs, jnp.float64),
                                             criterion_weights=jnp.asarray(w, jnp.float64),
                                             criterion_mask=jnp.asarray(m, jnp.float64))
            return loss.sum()

        grad = np.asarray(jax.grad(total)(args[0]))
        step = 1e-6
        fd = np.array([(total(args[0].at[i].add(step)) - total(args[0].at[i].add(-step))) / (2 * step)
                       for i in range(B)])
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-9)
    assert grad[1] == 0  # the tied pair trains nothing


@pytest.mark.parametrize("loss_type", losses.LOSS_TYPES)
def test_stable_at_extreme_margins(loss_type):
    pc = jnp.array([1e4, -1e4, 0.0], jnp.float32)
    zeros = jnp.zeros(3, jnp.float32)
    scores = dict(chosen_scores=jnp.ones((3, 2)), rejected_scores=jnp.zeros((3, 2))) if loss_type == "rubric" else {}

    def total(pc):
        return losses.preference_loss(pc, zeros, zeros, zeros, loss_type=loss_type, beta=1.0,
                                      label_smoothing=0.1 if loss_type in ("cdpo", "robust") else 0.0, **scores)[0]

    loss = total(pc)
    grad = jax.jacobian(lambda x: total(x).sum())(pc)
    assert np.isfinite(loss).all() and np.isfinite(grad).all()
    if loss_type in ("sigmoid", "rubric"):
        np.testing.assert_allclose(loss, [0.0, 1e4, np.log(2)], rtol=1e-6)


def test_errors_are_clear():
    """The settings are checked once, when made (`train_step.DPOSettings`); the loss checks its inputs."""
    x = jnp.zeros(2)
    with pytest.raises(ValueError, match="loss_type: 'dpo' is not one of"):
        train_step.DPOSettings(loss_type="dpo", beta=0.1)
    with pytest.raises(ValueError, match="'rubric' needs chosen_scores and rejected_scores"):
        losses.preference_loss(x, x, x, x, loss_type="rubric", beta=0.1)
    with pytest.raises(ValueError, match=r"label_smoothing: must be in \[0, 0.5\)"):
        train_step.DPOSettings(loss_type="robust", beta=0.1, label_smoothing=0.5)


def test_token_nll():
    np.testing.assert_allclose(losses.token_nll(jnp.array([-6.0, 0.0]), jnp.array([3.0, 0.0])), [2.0, 0.0])
