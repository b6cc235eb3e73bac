"""Scanned decoder layers (`model.scan_layers`): stacked parameters run by lax.scan give the unrolled
model's logits and gradients (with and without remat), read and write the same Hugging Face tensors, shard
with the stacked axis whole, and sample the same tokens through the stacked KV cache."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx
from jax.sharding import PartitionSpec as P

from rdpo_jax import sampling, sharding
from rdpo_jax.models import config as config_lib
from rdpo_jax.models import families, hf, layers, safetensors_io
from tests import tiny

ON = config_lib.RunSettings(scan_layers="on")


def _case(family, tiny_llava, tiny_qwen):
    """(HF folder, the model call's arguments, mask of real tokens int[B, T]) of a tiny model."""
    if family == "llava":
        folder, _ = tiny_llava("siglip_qwen2")
        batch = tiny.inputs("siglip_qwen2")
        return folder, (batch["input_ids"], batch["pixel_values"], batch["attention_mask"]), batch["attention_mask"]
    from tests import tiny_qwen as tq

    folder, _ = tiny_qwen(False)
    batch = tq.inputs([([3, (1, 6, 10), 2, (1, 4, 4), 4], "left"), ([5, (1, 8, 8), 7], "right")], length=48)
    images, positions = tq.ours(batch, hf.read_config(folder).vision)
    return folder, (batch["input_ids"], images, batch["attention_mask"], positions), batch["attention_mask"]


def _logits_and_grads(model, args, mask):
    """The logits, and the gradients of a fixed random projection of the logits at real tokens by path."""
    args = jax.tree.map(jnp.asarray, args)
    vocab = model.config.text.vocab_size
    weights = jnp.asarray(np.random.default_rng(1).standard_normal((*mask.shape, vocab)), jnp.float32)
    weights = weights * jnp.asarray(mask, jnp.float32)[..., None]

    @nnx.jit
    def run(m):
        return nnx.value_and_grad(lambda m: jnp.sum(m(*args) * weights), has_aux=False)(m), m(*args)

    (_, grads), logits = run(model)
    return np.asarray(logits), {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}


def _unstacked(flat: dict, stacks: dict) -> dict:
    """Scanned paths (…, stack, rest…) [L, …] -> unrolled paths (…, stack, i, rest…); `stacks` maps a
    stack's path prefix to its number of layers."""
    out = {}
    for path, value in flat.items():
        prefix = next((p for p in stacks if path[:len(p)] == p), None)
        if prefix is None:
            out[path] = value
        else:
            k = len(prefix)
            out.update({(*path[:k], i, *path[k:]): value[i] for i in range(stacks[prefix])})
    return out


@pytest.mark.parametrize("family, remat", [("llava", "none"), ("llava", "full"), ("qwen", "none")])
def test_scanned_equals_unrolled_logits_and_gradients(tiny_llava, tiny_qwen, family, remat):
    folder, args, mask = _case(family, tiny_llava, tiny_qwen)
    unrolled, cfg = hf.load_hf(folder)
    scanned, _ = hf.load_hf(folder, dataclasses.replace(ON, remat=remat))
    L = cfg.text.num_layers
    kernel = scanned.language_model.layers.self_attn.q_proj.kernel
    assert kernel.shape == (L, cfg.text.hidden_size, cfg.text.num_heads * cfg.text.head_dim)
    assert kernel.get_metadata()["logical_axes"] == (layers.STACKED, "embed", "heads")
    assert kernel.get_metadata()["shard_units"] == (1, 1, cfg.text.head_dim)
    if family == "llava":  # its last feature layer is the last layer: none is skipped
        stacks = {("language_model", "layers"): L, ("vision_tower", "encoder", "layers"): cfg.vision.num_layers}
    else:  # a window-attention block and a full-attention one
        stacks = {("language_model", "layers"): L, ("visual", "blocks"): cfg.vision.depth}
        assert len(cfg.vision.fullatt_block_indexes) < cfg.vision.depth

    want_logits, want = _logits_and_grads(unrolled, args, mask)
    got_logits, got = _logits_and_grads(scanned, args, mask)
    assert tiny.max_diff_on_tokens(got_logits, want_logits, mask) <= 1e-5
    got = _unstacked(got, stacks)
    assert want.keys() == got.keys()
    # float32 rounding: relative to each gradient, and to the largest one for those that are zero in exact
    # arithmetic (a key bias does not change a softmax) and hold only rounding noise
    scale = max(np.linalg.norm(g) for g in want.values())
    for path in want:
        err = np.linalg.norm(got[path] - want[path])
        assert err <= 1e-5 * np.linalg.norm(want[path]) + 1e-6 * scale, (path, err)


def test_scanned_vision_tower_skips_the_layers_after_the_last_feature_layer(tiny_llava):
    """clip_llama takes features from layer -2: the scan runs the first layers only, the last one gets
    a zero gradient, and the features equal the unrolled tower's."""
    folder, _ = tiny_llava("clip_llama")
    unrolled, cfg = hf.load_hf(folder)
    scanned, _ = hf.load_hf(folder, ON)
    px = jnp.asarray(tiny.inputs("clip_llama")["pixel_values"])
    features = nnx.jit(lambda m: m.image_features(px)[0])
    np.testing.assert_allclose(np.asarray(features(scanned)), np.asarray(features(unrolled)), atol=1e-5)
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m.image_features(px)[0] ** 2)))(scanned)
    fc1 = np.asarray(grads["vision_tower"]["encoder"]["layers"]["mlp"]["fc1"]["kernel"].get_value())
    assert np.all(fc1[-1] == 0) and np.all(np.abs(fc1[:-1]).sum(axis=(1, 2)) > 0)


def test_scanned_round_trip_is_exact_and_the_stacked_axis_is_whole(tiny_llava, tmp_path):
    folder, _ = tiny_llava("clip_llama")
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model, cfg = hf.load_hf(folder, ON, mesh=mesh)  # each device reads its slices of every layer
    up = model.language_model.layers.mlp.up_proj.kernel.get_value()
    assert up.shape[0] == cfg.text.num_layers and up.sharding.spec == P(None, "fsdp", "tensor")
    files = hf.save_hf(model, str(tmp_path), folder)
    written = safetensors.numpy.load_file(str(tmp_path / files[1]))
    source = {}
    for f in (f for f in os.listdir(folder) if f.endswith(".safetensors")):
        source.update(safetensors.numpy.load_file(os.path.join(folder, f)))
    family = families.of(model)
    source = {hf.canonical_name(k, family): v for k, v in source.items()}
    assert {hf.canonical_name(k, family) for k in written} == set(source)
    for k, v in written.items():
        np.testing.assert_array_equal(v, source[hf.canonical_name(k, family)], err_msg=k)
    assert "language_model.model.layers.1.mlp.up_proj.weight" in written


def test_scanned_sampling_equals_unrolled(tiny_qwen):
    """Qwen2.5-VL greedy decoding (M-RoPE, left padding, images) through the stacked [L, B, S, K, H] cache,
    several samples per prompt (the cache repeated along its batch axis)."""
    from tests import tiny_qwen as tq

    folder, _ = tiny_qwen(False)
    rows = [([3, (1, 6, 10), 2, (1, 4, 4), 4], "left"), ([5, (1, 8, 8), 7], "left"), ([11], "left")]
    batch = tq.inputs(rows, length=48)
    sc = sampling.SamplingConfig(max_new_tokens=8, temperature=0.0, num_samples=2)
    out = []
    for run in (config_lib.RunSettings(), ON):
        model, cfg = hf.load_hf(folder, run)
        assert model.language_model.scan == (run is ON)
        images, positions = tq.ours(batch, cfg.vision)
        tokens, lengths = sampling.generate(model, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                                            images, jax.random.key(0), sc, positions=jnp.asarray(positions))
        out.append(np.asarray(tokens))
    np.testing.assert_array_equal(out[1], out[0])
    np.testing.assert_array_equal(out[0][0::2], out[0][1::2])  # greedy: both samples of a prompt agree
