"""The Qwen2.5-VL vision tower equals transformers' (fp32, ≤ 1e-4): one buffer holding three images of
different sizes (merged grids that are not multiples of the window: partial windows), window attention in
the blocks outside fullatt_block_indexes and per-image full attention in those, padding patches at the end;
one compiled program for two different mixes of image sizes."""

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from rdpo_jax.models.qwen2_5_vl import images as qi
from rdpo_jax.models.qwen2_5_vl.config import QwenVisionConfig
from rdpo_jax.models import hf, layers
from rdpo_jax.models.qwen2_5_vl import vision as qv

HF_CONFIG = dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=4, patch_size=4, spatial_merge_size=2,
                 temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1, 3], out_hidden_size=64,
                 tokens_per_second=2)


@pytest.fixture(scope="module")
def towers():
    torch.manual_seed(0)
    hf_cfg = transformers.Qwen2_5_VLVisionConfig(**HF_CONFIG)
    hf_cfg._attn_implementation = "eager"
    theirs = transformers.models.qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel(hf_cfg)
    theirs.eval()
    with torch.no_grad():  # random biases and norm scales too, so that every parameter matters
        for p in theirs.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cfg = QwenVisionConfig.from_hf(hf_cfg)
    ours = qv.QwenVisionTower(cfg, rngs=layers.InitKeys(jax.random.key(0)))
    weights = {k: v.numpy() for k, v in theirs.state_dict().items()}
    for path, var in nnx.to_flat_state(nnx.state(ours, nnx.Param)):
        *parents, leaf = (str(p) for p in path)
        name = ".".join(parents + ["weight" if leaf in ("kernel", "scale") else leaf])
        w = hf._to_ours(path, weights.pop(name), var.get_value().shape)  # as load_hf reads it
        assert w.shape == var.get_value().shape, name
        var.set_value(jax.numpy.asarray(w))
    assert not weights, sorted(weights)  # every tensor of theirs has a home in ours
    return cfg, ours, theirs


def _theirs(theirs, patches, grids):
    with torch.no_grad():
        return theirs(torch.tensor(patches), grid_thw=torch.tensor(grids)).pooler_output.numpy()


@pytest.mark.parametrize("grids", [[(1, 6, 10), (1, 4, 4), (1, 10, 6)], [(1, 8, 8), (1, 2, 14)]])
def test_equals_transformers(towers, grids):
    cfg, ours, theirs = towers
    rng = np.random.default_rng(0)
    n = sum(t * h * w for t, h, w in grids)
    patches = rng.normal(size=(n, 3 * 2 * 4 * 4)).astype(np.float32)
    buffer = 256  # the same program for both mixes of sizes
    meta = qi.patch_metadata(grids, cfg.merge_size, buffer)
    padded = np.concatenate([patches, np.zeros((buffer - n, patches.shape[1]), np.float32)])
    forward = nnx.jit(lambda m, x, i, r, c: m(x[None], i[None], r[None], c[None])[0])
    got = np.asarray(forward(ours, padded, meta["image"], meta["row"], meta["col"]))[:n // 4]
    expected = _theirs(theirs, patches, grids)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    # each image alone gives its own rows of the packed result: no attention across images
    first = grids[0][1] * grids[0][2]
    np.testing.assert_allclose(_theirs(theirs, patches[:first], grids[:1]), got[:first // 4], rtol=0, atol=1e-4)


def test_windows_differ_from_full_attention(towers):
    """With every block made a window block the result changes: the windows really restrict attention."""
    cfg, ours, _ = towers
    grids = [(1, 6, 10)]
    meta = qi.patch_metadata(grids, cfg.merge_size, 64)
    full, windowed = ours.masks(*(jax.numpy.asarray(meta[k])[None] for k in ("image", "row", "col")))
    full, windowed = np.asarray(full[0]), np.asarray(windowed[0])
    assert windowed.sum() < full.sum() == 60 * 60 and not full[60:].any()
    # a merged 3×5 grid in windows of 2×2 merged tokens: windows of 4, 4, 2, 2, 2, 1 merge blocks
    sizes = sorted(np.unique(windowed[:60].sum(1) // 4))
    assert sizes == [1, 2, 4]


def test_buffer_overflow_is_an_error(towers):
    cfg, *_ = towers
    with pytest.raises(ValueError, match="exceed the buffer"):
        qi.patch_metadata([(1, 8, 8), (1, 8, 8)], cfg.merge_size, 100)
