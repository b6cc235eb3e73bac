"""The jitted steps: accumulation = full batch, sharded = single device, layouts and references agree,
freezing and per-group learning rates do what they say."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rdpo_jax import logps, optim, packing, sharding, train_step
from rdpo_jax.models import families, hf
from rdpo_jax.models.config import RunSettings
from tests import tiny

NAME = "siglip_qwen2"
B, K = 8, 4


def _batch(cfg, layout="shared_prefix", seed=0):
    rng = np.random.default_rng(seed)
    F = cfg.image_seq_len
    pairs = [([7 + i] + [tiny.IMAGE_TOKEN] * F + list(rng.integers(6, tiny.VOCAB, 1 + i % 3)),
              [list(rng.integers(6, tiny.VOCAB, 2 + i % 4)), list(rng.integers(6, tiny.VOCAB, 5 - i % 3))])
             for i in range(B)]
    pixels = rng.standard_normal((B, 32, 32, 3)).astype(np.float32)
    rubric = {"chosen_scores": rng.integers(0, 2, (B, K)).astype(np.float32),
              "rejected_scores": rng.integers(0, 2, (B, K)).astype(np.float32),
              "criterion_weights": rng.uniform(0.5, 2, (B, K)).astype(np.float32),
              "criterion_mask": np.ones((B, K), np.float32),
              "essential_mask": (np.arange(K) < 2).astype(np.float32)[None].repeat(B, 0)}
    groups = [packing.Group(prompt, answers, fields={k: v[i:i + 1] for k, v in rubric.items()},
                            valid=i < B - 1)  # the last a padding pair: must not count
              for i, (prompt, answers) in enumerate(pairs)]
    batch, _ = packing.pack(groups, layout=layout, seq_len=F + 14, max_answer_len=6, images={"pixel_values": pixels})
    return batch


def _sft_batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    F = cfg.image_seq_len
    examples = [packing.Group([3] + [tiny.IMAGE_TOKEN] * F + [9] * (1 + i % 2),
                              [list(rng.integers(6, tiny.VOCAB, 2 + i % 5))], ()) for i in range(B)]
    batch, _ = packing.pack(examples, layout="sft", seq_len=F + 9, max_answer_len=7,
                            images={"pixel_values": rng.standard_normal((B, 32, 32, 3)).astype(np.float32)})
    return batch


def _run(folder, mesh, batch, *, optimizer=None, steps=1, freeze=(), objective="dpo", dtype=jnp.float32,
         schedule=None, vocab_chunk=0, **kw):
    model, _ = hf.load_hf(folder, RunSettings(param_dtype=dtype, vocab_chunk=vocab_chunk), mesh=mesh)
    schedule = schedule or optax.constant_schedule(1.0)
    optimizer = optimizer or optax.sgd(1.0)
    reference = kw.get("reference", "model") == "model" and objective == "dpo"
    graphdef, state = train_step.init_state(model, optimizer, freeze=freeze, reference=reference)
    params0 = jax.tree.map(np.asarray, state.params)
    if objective == "dpo":
        accum_steps = kw.pop("accum_steps", 1)
        fn = train_step.make_dpo_step(graphdef, optimizer, schedule, train_step.DPOSettings(**kw),
                                      accum_steps=accum_steps).train
    else:
        fn = train_step.make_sft_step(graphdef, optimizer, schedule, **kw).train
    step = train_step.jit_step(fn, state, batch, mesh)
    for _ in range(steps):
        state, metrics = step(state, batch)
    return params0, state, _scalars(metrics)


def _scalars(metrics: dict) -> dict[str, float]:
    """The step's metrics as floats; `reference_check`'s entries as "reference_check/NAME[/i]"."""
    out = {}
    for name, value in jax.device_get(metrics).items():
        if isinstance(value, dict):
            for k, v in value.items():
                v = np.ravel(v)
                out.update({f"{name}/{k}" + (f"/{i}" if len(v) > 1 else ""): float(x) for i, x in enumerate(v)})
        else:
            out[name] = float(value)
    return out


def _close(a, b, rtol=1e-6, atol=1e-7):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


# An "optimizer" that stores the gradient it is given as its state (and leaves parameters alone).
_RECORD_GRADS = optax.GradientTransformation(
    lambda params: jax.tree.map(jnp.zeros_like, params),
    lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


@pytest.fixture(scope="module")
def mesh1():
    return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


@pytest.mark.parametrize("objective,layout,loss_type", [
    ("dpo", "shared_prefix", "rubric"), ("dpo", "concat", "sigmoid"), ("sft", None, None)])
def test_accumulated_gradients_equal_full_batch(tiny_llava, mesh1, objective, layout, loss_type):
    folder, _ = tiny_llava(NAME)
    _, cfg = hf.load_hf(folder)
    kw = dict(loss_type=loss_type, beta=0.5, gamma=0.2, pair_layout=layout) if objective == "dpo" else {}
    batch = _batch(cfg, layout) if objective == "dpo" else _sft_batch(cfg)
    if objective == "dpo":  # move off the reference so that the loss has a gradient worth comparing
        batch = _off_reference(batch)
        kw["reference"] = "precomputed"
    # float64, so that the comparison sees the accumulation and not fp32 rounding of different shapes
    with jax.enable_x64(True):
        run = functools.partial(_run, folder, mesh1, batch, optimizer=_RECORD_GRADS, objective=objective,
                                dtype=jnp.float64, **kw)
        (_, full, m_full), (_, accum, m_accum) = run(accum_steps=1), run(accum_steps=4)
    assert jax.tree.leaves(full.opt_state)[0].dtype == np.float64
    grad_full = jax.tree.map(np.asarray, full.opt_state)
    grad_accum = jax.tree.map(np.asarray, accum.opt_state)
    norm = np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in jax.tree.leaves(grad_full)))
    diff = np.sqrt(sum(float(np.sum((a.astype(np.float64) - b) ** 2))
                       for a, b in zip(jax.tree.leaves(grad_full), jax.tree.leaves(grad_accum))))
    assert norm > 1e-2 and diff / norm <= 1e-12, (diff, norm)  # relative error of the whole gradient
    # the valid pairs, or the answer tokens of the SFT examples (`_sft_batch`: 2 + i % 5 each)
    assert m_full["count"] == m_accum["count"] == (B - 1 if objective == "dpo" else sum(2 + i % 5 for i in range(B)))
    # every metric, the reference check's pair slot too (its per-pair values come back in batch order)
    assert ("reference_check/slot" in m_full) == (objective == "dpo")
    assert set(m_accum) == set(m_full)
    for key in m_full:
        assert m_accum[key] == pytest.approx(m_full[key], rel=1e-5, abs=1e-6), key


def test_sharded_step_equals_single_device(tiny_llava, mesh1, capfd):
    """Also: the LM head computed in vocabulary chunks (`layers.target_logps`) = computed whole."""
    folder, _ = tiny_llava(NAME)
    _, cfg = hf.load_hf(folder)
    batch = _batch(cfg)
    kw = dict(loss_type="sigmoid", beta=0.1, sft_weight=0.1, accum_steps=2)
    adamw = optim.make_optimizer(learning_rate=1e-2, weight_decay=0.1, grad_clip=1.0)
    mesh8 = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    # float64: Adam divides by √v, which turns fp32 rounding of near-zero gradients into visible steps
    with jax.enable_x64(True):
        _, single, m_single = _run(folder, mesh1, batch, optimizer=adamw, steps=2, dtype=jnp.float64, **kw)
        # sharded, with the LM head in 4 vocabulary chunks of 40 (the vocabulary of 160 split over tensor)
        _, sharded, m_sharded = _run(folder, mesh8, batch, optimizer=adamw, steps=2, dtype=jnp.float64,
                                     vocab_chunk=48, **kw)
    q = sharded.params["language_model"]["layers"][0]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    moments = [x for kp, x in jax.tree_util.tree_flatten_with_path(sharded.opt_state)[0]
               if optim.path_str(kp).endswith("language_model/layers/0/self_attn/q_proj/kernel")]
    assert len(moments) == 2 and all(m.sharding == q.sharding for m in moments)  # Adam's mu and nu
    _close(single.params, sharded.params, rtol=1e-10, atol=1e-12)
    for key in m_single:
        assert m_sharded[key] == pytest.approx(m_single[key], rel=1e-10, abs=1e-12), key
    assert m_single["loss"] != 0 and int(sharded.step) == 2
    # The step is traced on its mesh, so the model's activation constraints apply; without them XLA
    # resharded the embedding cotangent by replicating it whole ("involuntary full rematerialization").
    assert "Involuntary full rematerialization" not in capfd.readouterr().err


def _off_reference(batch):
    """Precomputed reference log-likelihoods far from the policy's, so that z (and its sign) is robust."""
    return batch.replace(ref_chosen_logp=np.full((B, 1), -3.0, np.float32),
                         ref_rejected_logp=np.full((B, 1), -40.0, np.float32))


def _delta(p0, state):
    return jax.tree.map(lambda a, b: a - np.asarray(b), p0, state.params)


def test_layouts_agree(tiny_llava, mesh1):
    """One DPO step on the same pairs in every layout: the same update and the same metrics."""
    folder, _ = tiny_llava(NAME)
    _, cfg = hf.load_hf(folder)
    results = {}
    for layout in packing.LAYOUTS:
        p0, state, metrics = _run(folder, mesh1, _off_reference(_batch(cfg, layout)), loss_type="rubric", beta=0.1,
                                  gamma=0.1, pair_layout=layout, reference="precomputed")
        results[layout] = (_delta(p0, state), metrics)
    delta, metrics = results["shared_prefix"]
    assert metrics["count"] == B - 1 and metrics["loss"] > 0
    for layout in ("concat", "multi_answer"):
        _close(delta, results[layout][0], rtol=1e-4, atol=1e-6)
        assert set(results[layout][1]) == set(metrics), layout
        for key, value in metrics.items():
            assert results[layout][1][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (layout, key)


def test_online_reference_equals_precomputed(tiny_llava, mesh1):
    folder, _ = tiny_llava(NAME)
    model, cfg = hf.load_hf(folder)
    batch = _batch(cfg)
    p0, online, m_online = _run(folder, mesh1, batch, loss_type="rubric", beta=0.1)
    # at step 0 the policy is the reference: z = 0 and the rubric loss is log 2
    assert m_online["loss"] == pytest.approx(np.log(2), rel=1e-5) and online.ref_params is not None
    ref = logps.pair_logps(model, batch, layout="shared_prefix")
    batch = batch.replace(**{f"ref_{k}": np.asarray(ref[k]).reshape(B, 1) for k in ("chosen_logp", "rejected_logp")})
    _, pre, m_pre = _run(folder, mesh1, batch, loss_type="rubric", beta=0.1, reference="precomputed")
    assert pre.ref_params is None
    # the step's own check of the precomputed values: the policy's at step 0, far within the tolerance
    assert 0 <= m_pre["reference_check/ratio"] < 1e-3
    _close(_delta(p0, pre), _delta(p0, online), rtol=1e-4, atol=1e-6)
    assert m_pre["loss"] == pytest.approx(m_online["loss"], rel=1e-5)


def test_reference_from_another_model(tiny_llava, mesh1):
    """`new_state(..., reference=)`: the reference copy holds the other model's trainable parameters, the
    policy its own; a reference whose frozen parameters differ is refused (it has no copy of them)."""
    folder, _ = tiny_llava(NAME)
    model, _ = hf.load_hf(folder, mesh=mesh1)
    optimizer = optax.sgd(1.0)
    freeze = (re.compile("vision_tower/.*"),)
    graphdef, abstract = train_step.abstract_state(families.abstract_model(model.config, model.run), optimizer, mesh1,
                                                   freeze=freeze, reference=True)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    other = jax.tree.map(lambda x: x, params)
    other["language_model"] = jax.tree.map(lambda x: x + 1.0, params["language_model"])
    state = train_step.new_state(params, optimizer, abstract, other)
    _close(state.ref_params["language_model"], jax.tree.map(lambda x: x + 1.0, params["language_model"]))
    _close(state.params["language_model"], params["language_model"])
    _close(state.ref_params["multi_modal_projector"], params["multi_modal_projector"])
    other["vision_tower"] = jax.tree.map(lambda x: x * 2.0, params["vision_tower"])
    with pytest.raises(ValueError, match="frozen parameters differ"):
        train_step.new_state(params, optimizer, abstract, other)


def test_freeze_and_group_learning_rates(tiny_llava, mesh1):
    folder, _ = tiny_llava(NAME)
    _, cfg = hf.load_hf(folder)
    adam = optim.make_optimizer(learning_rate=1e-3, lr_multipliers=(("multi_modal_projector/.*", 10.0),))
    p0, state, _ = _run(folder, mesh1, _batch(cfg), optimizer=adam, freeze=("vision_tower/.*",),
                        loss_type="sigmoid", beta=0.1, reference="none")
    assert "vision_tower" not in state.params and "vision_tower" in state.frozen
    assert not any("vision_tower" in jax.tree_util.keystr(kp) for kp, _ in
                   jax.tree_util.tree_flatten_with_path(state.opt_state)[0])
    model, _ = hf.load_hf(folder)
    original = np.asarray(model.vision_tower.encoder["layers"][0].mlp["fc1"].kernel.get_value())
    np.testing.assert_array_equal(state.frozen["vision_tower"]["encoder"]["layers"][0]["mlp"]["fc1"]["kernel"], original)
    # Adam's first step moves each weight by ≈ lr (sign of the gradient): 10× on the projector.
    proj = np.abs(p0["multi_modal_projector"]["linear_1"]["kernel"] - state.params["multi_modal_projector"]["linear_1"]["kernel"])
    mlp = np.abs(p0["language_model"]["layers"][0]["mlp"]["up_proj"]["kernel"]
                 - state.params["language_model"]["layers"][0]["mlp"]["up_proj"]["kernel"])
    assert np.median(proj) == pytest.approx(1e-2, rel=0.05) and np.median(mlp) == pytest.approx(1e-3, rel=0.05)
    with pytest.raises(ValueError, match="freeze pattern 'vision/.*' matches no parameter"):
        optim.split_params(model, ("vision/.*",))


# One DPO step (sigmoid, precomputed reference; AdamW with weight decay on a decaying schedule: every update
# moves the parameters, so a step that skips shows) compiled once for the three tests below.
SCHEDULE = optim.learning_rate_schedule(learning_rate=1e-2, schedule="linear", warmup_steps=0, total_steps=8)


@pytest.fixture(scope="module")
def adamw_step(tiny_llava, mesh1):
    """(fresh, step, batch): `fresh()` a new train state of the tiny model (the step donates it), `step` the
    jitted step, `batch` a batch off the reference."""
    folder, _ = tiny_llava(NAME)
    adamw = optim.make_optimizer(learning_rate=SCHEDULE, weight_decay=0.1)

    def fresh():
        model, _ = hf.load_hf(folder, mesh=mesh1)
        return train_step.init_state(model, adamw)

    graphdef, state = fresh()
    batch = _off_reference(_batch(hf.read_config(folder)))
    fn = train_step.make_dpo_step(graphdef, adamw, SCHEDULE,
                                  train_step.DPOSettings(loss_type="sigmoid", beta=0.1, reference="precomputed")).train
    return lambda: fresh()[1], train_step.jit_step(fn, state, batch, mesh1), batch


def test_a_batch_without_valid_pairs_updates_nothing(adamw_step, capsys):
    """Every record of the global batch skipped as bad (valid all 0): the gradient is zero, but Adam's
    momentum and weight decay would still move the parameters and the schedule would advance. Parameters,
    optimizer state and the optimizer's count stay; only the data position moves; `empty` says so, the
    trainer's log counts such steps (`empty_batches`), averages only the steps that trained and prints
    the empty ones."""
    from rdpo_jax import train

    fresh, step, full = adamw_step
    empty = full.replace(valid=np.zeros((B, 1), np.float32))
    state = fresh()
    before = jax.tree.map(np.asarray, (state.params, state.opt_state))
    window = train._Window(max_nonfinite=2, source=None)
    state, metrics = step(state, empty)
    window.add(1, metrics, {"index": np.full(B, -1), "stats": {"examples": 0, "skipped/schema": B}}, empty)
    _close(before, (state.params, state.opt_state), rtol=0, atol=0)
    assert int(optim.updates_applied(state.opt_state)) == 0 and int(state.step) == 1
    assert float(metrics["empty"]) == 1 and float(metrics["count"]) == 0 and float(metrics["nonfinite"]) == 0
    state, metrics = step(state, full)  # the next batch trains as a run's first update
    window.add(2, metrics, {"index": np.arange(B), "stats": {"examples": B - 1}}, full)
    assert float(metrics["empty"]) == 0 and int(optim.updates_applied(state.opt_state)) == 1
    logged = window.flush()
    assert logged["empty_batches"] == 1 and logged["loss"] == pytest.approx(float(metrics["loss"]))
    assert logged["skipped/schema"] == B
    assert "steps 1: no valid record in the global batch" in capsys.readouterr().out


def test_nonfinite_update_is_skipped(adamw_step):
    fresh, step, batch = adamw_step
    batch = jax.tree.map(np.copy, batch)
    batch.ref_chosen_logp[2] = np.nan  # one poisoned pair makes the loss and every gradient NaN
    state = fresh()
    p0 = jax.tree.map(np.asarray, state.params)
    state, metrics = step(state, batch)
    metrics = _scalars(metrics)
    assert metrics["nonfinite"] == 1.0 and np.isnan(metrics["loss"])
    _close(p0, state.params, rtol=0, atol=0)  # no update …
    moments = [x for kp, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
               if "mu" in jax.tree_util.keystr(kp) or "nu" in jax.tree_util.keystr(kp)]
    assert moments and all(np.all(np.asarray(x) == 0) for x in moments)  # … nor moment updates
    assert int(state.step) == 1


def test_logged_lr_is_the_rate_applied_after_a_skipped_step(adamw_step):
    fresh, step, clean = adamw_step
    poisoned = jax.tree.map(np.copy, clean)
    poisoned.ref_chosen_logp[2] = np.nan
    state, lrs = fresh(), []
    for batch in (clean, poisoned, clean):
        state, metrics = step(state, batch)
        lrs.append(float(metrics["lr"]))
    # updates 0 and 1 are applied at schedule(0) and schedule(1); the skipped step applied nothing and did not
    # advance the optimizer's count, though the data position (state.step) moved on
    assert lrs == pytest.approx([float(SCHEDULE(0)), float(SCHEDULE(1)), float(SCHEDULE(1))])
    assert lrs[0] != lrs[1]
    assert int(state.step) == 3 and int(optim.updates_applied(state.opt_state)) == 2
