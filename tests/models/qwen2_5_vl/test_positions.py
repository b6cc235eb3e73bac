"""M-RoPE positions equal transformers' Qwen2_5_VLModel.get_rope_index: rows with zero to three images
of different grids, left and right padding, text only."""

import numpy as np
import pytest
import torch
import transformers

from rdpo_jax.models.qwen2_5_vl import positions as qp

IMAGE, START, END = 150, 152, 153


@pytest.fixture(scope="module")
def hf_model():
    config = transformers.Qwen2_5_VLConfig(
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=4, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[0],
                           out_hidden_size=64, tokens_per_second=2),
        text_config=dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=None, eos_token_id=None,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 3, 3])),
        image_token_id=IMAGE, video_token_id=151, vision_start_token_id=START, vision_end_token_id=END)
    return transformers.Qwen2_5_VLModel(config).eval()


def _row(rng, grids, text=(3, 5)):
    ids = list(rng.integers(10, 140, text[0]))
    for t, h, w in grids:
        ids += [START] + [IMAGE] * (t * h * w // 4) + [END] + list(rng.integers(10, 140, text[1]))
    return ids


@pytest.mark.parametrize("grids", [[(1, 4, 6)], [(1, 2, 2), (1, 6, 4)], [(1, 4, 4), (1, 2, 8), (1, 10, 2)], []])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_equals_get_rope_index(hf_model, grids, padding):
    rng = np.random.default_rng(len(grids))
    ids = _row(rng, grids)
    pad = 5 if padding != "none" else 0
    row = [0] * pad + ids if padding == "left" else ids + [0] * pad
    valid = np.array([False] * pad + [True] * len(ids) if padding == "left" else [True] * len(ids) + [False] * pad)
    types = (np.array(row) == IMAGE).astype(np.int64)
    positions, delta = qp.rope_index(types, grids, merge_size=2, valid=valid)
    if not grids:  # transformers' text-only rows never reach get_rope_index: 0..n-1 on all three rows
        np.testing.assert_array_equal(positions[:, valid], np.tile(np.arange(len(ids)), (3, 1)))
        assert delta == 0
        return
    expected, deltas = hf_model.get_rope_index(
        torch.tensor([row]), torch.tensor(types[None]), image_grid_thw=torch.tensor(grids),
        attention_mask=torch.tensor(valid[None].astype(np.int64)))
    np.testing.assert_array_equal(positions, expected[:, 0].numpy())
    assert delta == int(deltas[0])


def test_mismatched_grids_are_errors():
    types = np.array([0, 1, 1, 1, 1, 0])
    with pytest.raises(ValueError, match="an image run of 4 tokens, but its grid"):
        qp.rope_index(types, [(1, 2, 2)], merge_size=2)
    with pytest.raises(ValueError, match="2 image grids for fewer image runs"):
        qp.rope_index(types, [(1, 4, 4), (1, 4, 4)], merge_size=2)
    with pytest.raises(ValueError, match="video is not supported"):
        qp.rope_index(types, [(2, 4, 4)], merge_size=2)
