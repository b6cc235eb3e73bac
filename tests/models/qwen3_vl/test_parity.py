"""Qwen3-VL equals transformers' `Qwen3VLForConditionalGeneration` (fp32, eager attention, ≤ 1e-4 on
logits): rows with one, two and three images of different sizes, a text-only row, left and right padding,
tied and untied heads, decoder layers looped and scanned (DeepStack inside the scan); the resampled
position table equals transformers' taps; a shared-prefix row equals separate forwards; greedy decoding
equals `generate`; `save_hf` → `from_pretrained` with no missing or unexpected keys; sharded equals one
device."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from rdpo_jax import sharding
from rdpo_jax.models import config as config_lib
from rdpo_jax.models import hf, safetensors_io
from rdpo_jax.models.qwen3_vl import vision
from tests import tiny_qwen as tq

ATOL = 1e-4
MIXES = [tq.ROWS, [([4, (1, 12, 4), 3], "left"), ([9], "left"), ([1, (1, 4, 4), 1, (1, 8, 8), 2], "right"),
                   ([2, (1, 6, 6), 30], "right")]]


@pytest.mark.parametrize("tied, scan", [(False, "off"), (True, "on")], ids=["untied-looped", "tied-scanned"])
def test_logits_equal_transformers(tiny_qwen3, tied, scan):
    folder, theirs = tiny_qwen3(tied)
    model, cfg = hf.load_hf(folder, run=config_lib.RunSettings(scan_layers=scan))
    assert cfg.tie_word_embeddings == tied and hasattr(model, "lm_head") != tied
    assert cfg.vision.deepstack_visual_indexes == (0, 2) and cfg.text.mrope_interleaved
    forward, state = tq.forward(model)
    for seed, rows in enumerate(MIXES):
        batch = tq.inputs(rows, seed=seed)
        images, positions = tq.ours(batch, cfg.vision)
        got = np.asarray(forward(state, batch["input_ids"], images, batch["attention_mask"], positions))
        expected = tq.torch_logits(theirs, batch)
        valid = batch["attention_mask"].astype(bool)
        np.testing.assert_allclose(got[valid], expected[valid], rtol=0, atol=ATOL)
    assert forward._cache_size() == 1  # every mix of image sizes runs the same program


def test_position_taps_equal_transformers():
    """The bilinear taps into the position table, per patch of a packed buffer, equal transformers'
    `get_vision_interpolation_indices_and_weights` for the same grids (square, tall, wide, 2×2)."""
    from transformers import vision_utils

    from rdpo_jax.models.qwen2_5_vl import images as qwen_images

    grids, side, N = [(1, 6, 10), (1, 12, 4), (1, 2, 2), (1, 8, 8)], 4, 256
    meta = qwen_images.patch_metadata(grids, 2, N)
    indices, weights = vision.position_taps(*(jnp.asarray(meta[k])[None] for k in ("image", "row", "col")), side)
    want_i, want_w = vision_utils.get_vision_interpolation_indices_and_weights(
        torch.tensor(grids), side, mode="bilinear", align_corners=True, spatial_merge_size=2)
    real = sum(h * w for _, h, w in grids)
    np.testing.assert_array_equal(np.asarray(indices[0, :real]), want_i.numpy())
    np.testing.assert_array_equal(np.asarray(weights[0, :real]), want_w.numpy())


def test_shared_prefix_row_equals_two_transformers_forwards(tiny_qwen3):
    """DeepStack adds only at the prompt's placeholders: both answers equal separate transformers forwards."""
    folder, theirs = tiny_qwen3(False)
    model, cfg = hf.load_hf(folder)
    tq.check_shared_prefix_row(model, cfg, theirs, ATOL)


@pytest.mark.parametrize("scan", ["off", "on"])
def test_greedy_matches_transformers_generate(tiny_qwen3, scan):
    """DeepStack in the prefill (looped and scanned layers, a KV cache)."""
    folder, theirs = tiny_qwen3(False)
    model, cfg = hf.load_hf(folder, run=config_lib.RunSettings(scan_layers=scan))
    tq.check_greedy(model, cfg, theirs)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_save_hf_loads_in_transformers_with_same_logits(tiny_qwen3, tmp_path, tied):
    folder, theirs = tiny_qwen3(tied)
    model, _ = hf.load_hf(folder, run=config_lib.RunSettings(scan_layers="on"))
    hf.save_hf(model, str(tmp_path), folder)
    keys = safetensors_io.Reader(str(tmp_path)).keys()
    assert set(keys) == set(safetensors_io.Reader(folder).keys()) - ({"lm_head.weight"} if tied else set())
    assert json.load(open(tmp_path / "config.json"))["architectures"] == ["Qwen3VLForConditionalGeneration"]
    tq.check_reload(str(tmp_path), theirs, "Qwen3VLForConditionalGeneration")


@pytest.mark.parametrize("edit, field", [
    (lambda c: c["vision_config"].update(deepstack_visual_indexes=[1, 7]), "vision_config.deepstack_visual_indexes"),
    (lambda c: c["vision_config"].update(deepstack_visual_indexes=[2, 0]), "vision_config.deepstack_visual_indexes"),
    (lambda c: c["vision_config"].update(num_position_embeddings=15), "vision_config.num_position_embeddings"),
    (lambda c: c["text_config"]["rope_parameters"].update(mrope_section=[4, 2, 1]),
     "text_config.rope_parameters.mrope_section"),
    (lambda c: c["vision_config"].update(out_hidden_size=32), "vision_config.out_hidden_size"),
])
def test_unsupported_config_is_named(tiny_qwen3, tmp_path, edit, field):
    folder, _ = tiny_qwen3(False)
    tq.check_config_error(folder, tmp_path, edit, field)


def test_sharded_equals_single_device(tiny_qwen3, capfd):
    """On an (fsdp 2, expert 2, tensor 2) mesh, layers scanned, the logits equal one device's, and XLA
    reshards nothing by gathering it whole (the position table's lookup once did)."""
    folder, _ = tiny_qwen3(False)
    mesh = sharding.make_mesh({"fsdp": 2, "expert": 2, "tensor": 2})
    run = config_lib.RunSettings(scan_layers="on")
    single, cfg = hf.load_hf(folder, run=run)
    sharded, _ = hf.load_hf(folder, run=run, mesh=mesh)
    batch = tq.inputs()
    images, positions = tq.ours(batch, cfg.vision)
    forward, state = tq.forward(single)
    expected = np.asarray(forward(state, batch["input_ids"], images, batch["attention_mask"], positions))
    forward, state = tq.forward(sharded)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.BATCH_AXES))
    args = jax.device_put((batch["input_ids"], images, batch["attention_mask"], positions), rows)
    with jax.set_mesh(mesh):
        got = np.asarray(sharding.traced_on(mesh, forward)(state, *args))
    valid = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(got[valid], expected[valid], rtol=0, atol=2e-5)
    assert "Involuntary full rematerialization" not in capfd.readouterr().err
