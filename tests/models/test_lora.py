"""Adapters (models/lora.py): a fresh adapter is the base exactly, switched off it is the base whatever its
values, merged it is the adapted model; a quantized base stays within the quantizer's bound; adapters on a
MoE's experts leave its routing alone and run expert-parallel as on one device; they shard by the base's rules."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rdpo_jax import sharding
from rdpo_jax.models import families, hf, lora, moe, quant
from rdpo_jax.models.config import RunSettings
from tests import tiny_qwen

SETTINGS = lora.LoRASettings(rank=4, alpha=8.0)
IDS = np.random.default_rng(0).integers(6, 150, (2, 12)).astype(np.int32)


def _randomize(model, seed=1):
    """Nonzero A and B (a fresh B is 0): adapters that change the model."""
    state = nnx.state(model, nnx.LoRAParam)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(tree, [0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))


@pytest.mark.parametrize("scan", ["off", "on"])
def test_fresh_adapters_are_the_base_switched_off_too_and_merge_is_the_adapted_model(tiny_qwen, scan):
    folder, _ = tiny_qwen(False)
    base, _ = hf.load_hf(folder, RunSettings(scan_layers=scan))
    expected = np.asarray(base(IDS))
    model, _ = hf.load_hf(folder, RunSettings(scan_layers=scan, lora=SETTINGS))
    names = [lora._path(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))]
    # q, k, v, o, gate, up, down: A and B each, per layer (stacked when scanned)
    assert len(names) == 14 * (1 if scan == "on" else 2), names
    a = model.language_model.layers
    a = (a if scan == "on" else a[0]).self_attn.q_proj.kernel_lora_a
    assert a.shape == ((2,) if scan == "on" else ()) + (64, 4) and a.dtype == jnp.float32
    assert np.abs(np.asarray(a[...])).max() <= 1 / np.sqrt(64) and np.asarray(a[...]).std() > 0  # PEFT's init
    np.testing.assert_array_equal(np.asarray(model(IDS)), expected)  # B = 0: exactly the base
    _randomize(model)
    adapted = np.asarray(model(IDS))
    assert np.abs(adapted - expected).max() > 0.1
    model.set_attributes(lora_on=False, raise_if_not_found=False)
    np.testing.assert_array_equal(np.asarray(model(IDS)), expected)  # off: exactly the base
    model.set_attributes(lora_on=True, raise_if_not_found=False)
    merged = lora.merge(model)
    assert not nnx.state(merged, nnx.LoRAParam)
    paths = [{p for p, _ in nnx.to_flat_state(nnx.state(m, nnx.Param))} for m in (merged, base)]
    assert paths[0] == paths[1]  # plain parameters, the base's names
    np.testing.assert_allclose(np.asarray(merged(IDS)), adapted, atol=2e-5 * np.abs(adapted).max())


@pytest.mark.parametrize("kind", quant.KINDS)
def test_quantized_base_within_the_quantizers_bound(tiny_qwen, kind):
    folder, _ = tiny_qwen(False)
    base, _ = hf.load_hf(folder)
    settings = dataclasses.replace(SETTINGS, quantize=kind, block=16)
    model, _ = hf.load_hf(folder, RunSettings(lora=settings))
    layer, float_layer = model.language_model.layers[0], base.language_model.layers[0]
    for name in ("self_attn/q_proj", "mlp/down_proj"):
        module = layer.self_attn.q_proj if name.startswith("self") else layer.mlp.down_proj
        w = (float_layer.self_attn.q_proj if name.startswith("self") else float_layer.mlp.down_proj).kernel[...]
        assert module.kernel is None and module.kernel_codes.dtype == (jnp.int8 if kind == "int8" else jnp.uint8)
        blocks = np.abs(np.asarray(w)).reshape(-1, 16, w.shape[-1]).max(1).repeat(16, 0)  # each weight's block absmax
        error = np.abs(np.asarray(lora.weight(module, "kernel", jnp.float32)) - np.asarray(w))
        assert (error <= quant.max_error(kind) * blocks + 1e-6).all(), name
    logits, expected = np.asarray(model(IDS)), np.asarray(base(IDS))
    # the whole model: int8 ~0.4% of a weight, nf4 ~9% RMS: the logits move in proportion
    bound = {"int8": 0.05, "nf4": 0.5}[kind] * np.abs(expected).max()
    assert 0 < np.abs(logits - expected).max() < bound
    assert nnx.state(model, nnx.LoRAParam)  # adapters on the quantized base


def test_adapters_shard_by_the_base_rules_rank_replicated(tiny_qwen):
    folder, _ = tiny_qwen(False)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, devices=jax.devices()[:4])
    model, _ = hf.load_hf(folder, RunSettings(lora=dataclasses.replace(SETTINGS, quantize="nf4", block=16)), mesh=mesh)
    attn = model.language_model.layers[0].self_attn
    P = jax.sharding.PartitionSpec
    assert attn.q_proj.kernel_lora_a[...].sharding.spec == P("fsdp", None)
    assert attn.q_proj.kernel_lora_b[...].sharding.spec == P(None, "tensor")
    assert attn.o_proj.kernel_lora_a[...].sharding.spec == P("tensor", None)
    assert attn.q_proj.kernel_codes[...].sharding.spec == P("fsdp", "tensor")  # codes shard like the kernel
    single, _ = hf.load_hf(folder, RunSettings(lora=dataclasses.replace(SETTINGS, quantize="nf4", block=16)))
    np.testing.assert_allclose(np.asarray(sharding.traced_on(mesh, lambda m: m(IDS))(model)),
                               np.asarray(single(IDS)), rtol=1e-5, atol=1e-5)


def test_a_target_matching_nothing_is_an_error(tiny_qwen):
    folder, _ = tiny_qwen(False)
    with pytest.raises(ValueError, match="'visual/nothing/.*' matches no adaptable weight"):
        hf.load_hf(folder, RunSettings(lora=dataclasses.replace(SETTINGS, targets=("visual/nothing/.*",))))
    with pytest.raises(ValueError, match="config.lora.quantize: 'int4' is not one of"):
        lora.LoRASettings(rank=4, quantize="int4")


def test_dropout_draws_per_key_and_layer_and_only_inside_a_step(tiny_qwen):
    folder, _ = tiny_qwen(False)
    model, _ = hf.load_hf(folder, RunSettings(scan_layers="on", lora=dataclasses.replace(SETTINGS, dropout=0.5)))
    _randomize(model)
    plain = np.asarray(model(IDS))
    with lora.dropout_key(jax.random.key(0)):
        a, a2 = np.asarray(model(IDS)), np.asarray(model(IDS))
    with lora.dropout_key(jax.random.key(1)):
        b = np.asarray(model(IDS))
    np.testing.assert_array_equal(a, a2)  # the same key: the same masks (remat recomputes them alike)
    assert np.abs(a - plain).max() > 1e-3 and np.abs(a - b).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(model(IDS)), plain)  # outside a step: no dropout


@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory):
    folder, _ = tiny_qwen.build(True, str(tmp_path_factory.mktemp("qwen3_moe_lora")), family="qwen3_vl_moe",
                                mlp_only_layers=[])
    return folder


def test_adapters_on_experts_route_as_the_base_and_run_expert_parallel(moe_folder):
    settings = dataclasses.replace(SETTINGS, quantize="nf4", block=8)
    model, _ = hf.load_hf(moe_folder, RunSettings(scan_layers="on", lora=settings))
    experts = model.language_model.layers.mlp.experts
    L, E = model.config.text.num_layers, model.config.text.moe.num_experts
    assert experts.gate_up_proj_lora_a.shape[:2] == (L, E) == experts.down_proj_lora_b.shape[:2]  # one per expert
    _randomize(model)
    stacked = model.language_model.layers.mlp  # layer 0's block
    block = nnx.merge(nnx.graphdef(stacked), jax.tree.map(lambda a: a[0], nnx.state(stacked)))
    x = jax.random.normal(jax.random.key(3), (4, 6, 64))
    y, (probs, chosen) = block(x)
    block.set_attributes(lora_on=False, raise_if_not_found=False)
    y_base, (probs_base, chosen_base) = block(x)
    np.testing.assert_array_equal(np.asarray(chosen), np.asarray(chosen_base))  # the router is not adapted
    assert np.abs(np.asarray(y - y_base)).max() > 1e-3
    block.set_attributes(lora_on=True, raise_if_not_found=False)
    # the adapted block by hand: Σ_k weight_k · SwiGLU with W_e + s·A_e B_e of each chosen expert e
    w = {leaf: np.asarray(lora.weight(block.experts, leaf, jnp.float32)) + SETTINGS.scale * np.einsum(
        "eir,ero->eio", np.asarray(getattr(block.experts, leaf + "_lora_a")[...]),
        np.asarray(getattr(block.experts, leaf + "_lora_b")[...])) for leaf in ("gate_up_proj", "down_proj")}
    tokens, top = np.asarray(x).reshape(-1, 64), np.asarray(chosen)
    p = np.take_along_axis(np.asarray(probs), top, 1)
    p = p / p.sum(1, keepdims=True)
    expected = np.zeros_like(tokens)
    for n in range(len(tokens)):
        for k, e in enumerate(top[n]):
            gate, up = np.split(tokens[n] @ w["gate_up_proj"][e], 2)
            expected[n] += p[n, k] * ((gate / (1 + np.exp(-gate))) * up) @ w["down_proj"][e]
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 64), expected, rtol=1e-4, atol=1e-5)
    # experts (and their adapters) split over an expert axis of 2: the same loss and gradients
    graphdef, adapters, rest = nnx.split(block, nnx.LoRAParam, ...)
    grad = jax.value_and_grad(lambda a, x, rest: jnp.sum(nnx.merge(graphdef, a, rest)(x)[0] ** 2), argnums=(0, 1))
    v_1, g_1 = jax.jit(grad)(adapters, x, rest)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "expert": 2, "tensor": 1}, devices=jax.devices()[:4])
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    with jax.set_mesh(mesh):
        v_ep, g_ep = jax.jit(sharding.traced_on(mesh, grad))(*jax.device_put((adapters, x, rest), replicated))
    np.testing.assert_allclose(float(v_ep), float(v_1), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_ep), jax.tree.leaves(g_1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * np.abs(np.asarray(b)).max())
    assert isinstance(block, moe.SparseMoE) and "gate_up_proj_lora_b" in str(jax.tree_util.tree_structure(g_1))
