"""The MoE train step: the routers' load-balancing loss joins the DPO loss with the config's coefficient
(`moe/aux_loss` and per-expert `moe/load/{e}` logged), and the sharded step — data/fsdp/tensor, and with
the experts split over an expert axis (tokens moved by all-to-all) — equals the single-device step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rdpo_jax import logps, optim, packing, sharding, train_step
from rdpo_jax.models import hf
from rdpo_jax.models.config import RunSettings
from tests import tiny_qwen as tq


def _batch(pairs=8, seed=0):
    """Text-only pairs in shared-prefix rows (the vision side is the dense family's, tested there)."""
    rng = np.random.default_rng(seed)
    groups = [packing.Group(list(rng.integers(0, tq.IMAGE, 4 + i % 3)),
                            [list(rng.integers(0, tq.IMAGE, 2 + i % 4)), list(rng.integers(0, tq.IMAGE, 5 - i % 3))],
                            valid=i < pairs - 1) for i in range(pairs)]
    batch, _ = packing.pack(groups, layout="shared_prefix", seq_len=20, max_answer_len=6)
    return batch


def _run(folder, mesh, batch, steps=2):
    model, cfg = hf.load_hf(folder, RunSettings(param_dtype=jnp.float64), mesh=mesh)
    adamw = optim.make_optimizer(learning_rate=1e-2, weight_decay=0.1, grad_clip=1.0)
    graphdef, state = train_step.init_state(model, adamw, reference=True)
    fn = train_step.make_dpo_step(graphdef, adamw, optim.optax.constant_schedule(1.0),
                                  train_step.DPOSettings(loss_type="sigmoid", beta=0.1)).train
    step = train_step.jit_step(fn, state, batch, mesh)
    history = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        history.append({k: float(v) for k, v in jax.device_get(metrics).items() if np.ndim(v) == 0})
    return cfg, state, history


def test_aux_loss_joins_the_loss_and_sharded_equals_single(tiny_qwen3_moe):
    folder, _ = tiny_qwen3_moe("sparse")
    batch = _batch()
    mesh1 = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    mesh8 = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    mesh_ep = sharding.make_mesh({"fsdp": 2, "expert": 2, "tensor": 2})  # 2 of the 4 experts per device
    with jax.enable_x64(True):
        cfg, single, m_single = _run(folder, mesh1, batch)
        _, sharded, m_sharded = _run(folder, mesh8, batch)
        _, ep, m_ep = _run(folder, mesh_ep, batch)
    moe = cfg.text.moe
    first = m_single[0]
    # at step 1 the policy is its reference: the DPO loss is log 2, the rest the load-balancing term
    assert first["moe/aux_loss"] > 1.0  # E · Σ load·probability ≥ 1 (= 1 only for a perfectly even router)
    assert first["loss"] == pytest.approx(np.log(2) + moe.aux_loss_coef * first["moe/aux_loss"], rel=1e-12)
    loads = [first[f"moe/load/{e}"] for e in range(moe.num_experts)]
    assert sum(loads) == pytest.approx(moe.num_experts) and max(loads) > 1.0  # shares × E: mean 1
    experts = ep.params["language_model"]["layers"][1]["mlp"]["experts"]["gate_up_proj"]
    assert experts.sharding.spec == jax.sharding.PartitionSpec("expert", "fsdp", None)
    assert experts.addressable_shards[0].data.shape == (2, 32, 48)
    for other, m_other in ((sharded, m_sharded), (ep, m_ep)):
        for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(other.params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12)
        for step, (a, b) in enumerate(zip(m_single, m_other)):
            for key in a:
                if step == 0 and key == "rewards/accuracies":
                    continue  # margins of ±1e-17 around the reference: their sign is rounding
                assert b[key] == pytest.approx(a[key], rel=1e-10, abs=1e-12), key


def test_sft_loss_is_the_token_mean_nll_plus_the_load_balancing_term(tiny_qwen3_moe):
    folder, _ = tiny_qwen3_moe("sparse")
    rng = np.random.default_rng(1)
    groups = [packing.Group(list(rng.integers(0, tq.IMAGE, 3 + i % 3)), [list(rng.integers(0, tq.IMAGE, 2 + i % 4))])
              for i in range(8)]
    batch, _ = packing.pack(groups, layout="sft", seq_len=12, max_answer_len=6)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    model, cfg = hf.load_hf(folder, mesh=mesh)
    sgd = optim.optax.sgd(0.0)
    graphdef, state = train_step.init_state(model, sgd, reference=False)
    fn = train_step.make_sft_step(graphdef, sgd, optim.optax.constant_schedule(0.0)).train
    _, metrics = train_step.jit_step(fn, state, batch, mesh)(state, batch)
    tokens = np.asarray((batch.target_branch > 0) * batch.valid)
    nll = -float((np.asarray(logps.token_logps(model, batch)) * tokens).sum() / tokens.sum())
    assert float(metrics["moe/aux_loss"]) > 1.0
    assert float(metrics["loss"]) == pytest.approx(nll + cfg.text.moe.aux_loss_coef * float(metrics["moe/aux_loss"]),
                                                   rel=1e-5)
