"""Qwen2.5-VL equals transformers' `Qwen2_5_VLForConditionalGeneration` (fp32, eager attention, ≤ 1e-4 on
logits): rows with one, two and three images of different sizes (partial windows), a text-only row, left
and right padding, tied and untied heads; one compiled program for two different mixes of image sizes;
both on-disk layouts read; `save_hf` → `from_pretrained` with no missing or unexpected keys."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from rdpo_jax.models import hf, safetensors_io
from tests import tiny_qwen as tq

ATOL = 1e-4


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_logits_equal_transformers(tiny_qwen, tied):
    folder, theirs = tiny_qwen(tied)
    model, cfg = hf.load_hf(folder)
    assert cfg.tie_word_embeddings == tied and hasattr(model, "lm_head") != tied
    forward, state = tq.forward(model)
    mixes = [tq.ROWS, [([4, (1, 12, 4), 3], "left"), ([9], "left"), ([1, (1, 4, 4), 1, (1, 8, 8), 2], "right"),
                       ([2, (1, 6, 6), 30], "right")]]
    for seed, rows in enumerate(mixes):
        batch = tq.inputs(rows, seed=seed)
        images, positions = tq.ours(batch, cfg.vision)
        got = np.asarray(forward(state, batch["input_ids"], images, batch["attention_mask"], positions))
        expected = tq.torch_logits(theirs, batch)
        valid = batch["attention_mask"].astype(bool)
        np.testing.assert_allclose(got[valid], expected[valid], rtol=0, atol=ATOL)
    assert forward._cache_size() == 1  # every mix of image sizes runs the same program


def test_shared_prefix_row_equals_two_transformers_forwards(tiny_qwen):
    folder, theirs = tiny_qwen(False)
    model, cfg = hf.load_hf(folder)
    tq.check_shared_prefix_row(model, cfg, theirs, ATOL)


def test_reads_the_transformers5_layout(tiny_qwen, tmp_path):
    """A folder with transformers 5's in-memory names (`model.visual.*`, `model.language_model.*`) loads to
    the same parameters as the Hub layout."""
    folder, _ = tiny_qwen(False)
    reader = safetensors_io.Reader(folder)
    renamed = {}
    for key in reader.keys():
        new = "model." + key if key.startswith("visual.") else key.replace("model.", "model.language_model.", 1)
        renamed[new] = np.asarray(reader.get(key))
    assert any(k.startswith("model.visual.") for k in renamed) and any(k.startswith("model.language_model.")
                                                                       for k in renamed)
    safetensors_io.write(str(tmp_path), [safetensors_io.TensorSpec(k, v.dtype, v.shape, lambda v=v: v)
                                         for k, v in sorted(renamed.items())])
    with open(os.path.join(folder, "config.json")) as f, open(tmp_path / "config.json", "w") as g:
        g.write(f.read())
    a, _ = hf.load_hf(folder)
    b, _ = hf.load_hf(str(tmp_path))
    for (path, x), (_, y) in zip(nnx.to_flat_state(nnx.state(a, nnx.Param)), nnx.to_flat_state(nnx.state(b, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(x.get_value()), np.asarray(y.get_value()), err_msg=str(path))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_save_hf_loads_in_transformers_with_same_logits(tiny_qwen, tmp_path, tied):
    folder, theirs = tiny_qwen(tied)
    model, _ = hf.load_hf(folder)
    hf.save_hf(model, str(tmp_path), folder)
    keys = safetensors_io.Reader(str(tmp_path)).keys()
    assert any(k.startswith("visual.") for k in keys) and any(k.startswith("model.layers.") for k in keys)
    assert ("lm_head.weight" in keys) != tied
    tq.check_reload(str(tmp_path), theirs, "Qwen2_5_VLForConditionalGeneration")


@pytest.mark.parametrize("edit, field", [
    (lambda c: c["vision_config"].update(fullatt_block_indexes=[1, 7]), "vision_config.fullatt_block_indexes"),
    (lambda c: c["text_config"]["rope_parameters"].update(mrope_section=[2, 2, 2]),
     "text_config.rope_parameters.mrope_section"),
    (lambda c: c["text_config"].update(use_sliding_window=True, sliding_window=16), "text_config.use_sliding_window"),
    (lambda c: c["vision_config"].update(out_hidden_size=32), "vision_config.out_hidden_size"),
])
def test_unsupported_config_is_named(tiny_qwen, tmp_path, edit, field):
    folder, _ = tiny_qwen(False)
    tq.check_config_error(folder, tmp_path, edit, field)


def test_sharded_equals_single_device_and_heads_split_whole(tiny_qwen):
    """On a (data 2, fsdp 2, tensor 2) mesh the vision and text heads split over "tensor" by whole heads and
    the logits equal one device's."""
    from rdpo_jax import sharding

    folder, _ = tiny_qwen(False)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    single, cfg = hf.load_hf(folder)
    sharded, _ = hf.load_hf(folder, mesh=mesh)
    qkv = sharded.visual.blocks[0].attn.qkv.kernel.get_value()
    assert qkv.shape == (32, 3, 32) and qkv.sharding.spec[2] == "tensor"  # 4 heads of 8: 2 per device
    assert qkv.addressable_shards[0].data.shape[2] == 16
    batch = tq.inputs()
    images, positions = tq.ours(batch, cfg.vision)
    expected = np.asarray(tq.forward(single)[0](tq.forward(single)[1], batch["input_ids"], images,
                                              batch["attention_mask"], positions))
    forward, state = tq.forward(sharded)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    args = jax.device_put((batch["input_ids"], images, batch["attention_mask"], positions), rows)
    with jax.set_mesh(mesh):
        got = np.asarray(sharding.traced_on(mesh, forward)(state, *args))
    valid = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(got[valid], expected[valid], rtol=0, atol=2e-5)
