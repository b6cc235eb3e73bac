"""Qwen2-VL-family preprocessing equals transformers' Qwen2VLImageProcessor (PIL backend) on a real
photograph (matplotlib's sample image) at several sizes and aspect ratios, RGBA, greyscale and
EXIF-rotated; smart_resize keeps its bounds; the folder's pixel budget can be overridden."""

import io
import os

import matplotlib
import numpy as np
import pytest
import transformers
from PIL import Image, ImageOps

from rdpo_jax.models.qwen2_5_vl import images as qi

PHOTO = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg")


def _photo() -> Image.Image:
    return Image.open(PHOTO).convert("RGB")  # 512 × 600, a real photograph (JPEG)


def _variants():
    photo = _photo()
    rgba = photo.resize((300, 200)).convert("RGBA")
    alpha = np.zeros((200, 300), np.uint8)
    alpha[:, 150:] = 255  # half transparent: composited on white
    rgba.putalpha(Image.fromarray(alpha))
    return {"photo": photo, "wide": photo.resize((900, 170)), "tall": photo.resize((120, 700)),
            "tiny": photo.resize((30, 20)), "huge": photo.resize((2400, 1800)), "rgba": rgba,
            "grey": photo.convert("L").resize((333, 517))}


def _expected(processor, image):
    out = processor(image, return_tensors="np")
    return out["pixel_values"], tuple(int(v) for v in out["image_grid_thw"][0])


@pytest.mark.parametrize("kwargs", [{}, dict(min_pixels=64 * 28 * 28, max_pixels=256 * 28 * 28),
                                    dict(patch_size=16, merge_size=2, image_mean=(0.5,) * 3, image_std=(0.5,) * 3)])
def test_matches_transformers(kwargs):
    processor = transformers.Qwen2VLImageProcessorPil(**kwargs)
    cfg = qi.QwenImageConfig.from_hf(processor.to_dict())
    for name, image in _variants().items():
        expected, expected_grid = _expected(processor, image)
        got, got_grid = qi.preprocess(image, cfg)
        assert got_grid == expected_grid, name
        assert got.shape == expected.shape == (expected_grid[1] * expected_grid[2], cfg.patch_dim), name
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5, err_msg=name)
        assert cfg.min_pixels <= got_grid[1] * got_grid[2] * cfg.patch_size ** 2 <= cfg.max_pixels, name


def test_exif_orientation_is_applied():
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    _photo().resize((400, 240)).save(buf, "JPEG", exif=exif, quality=95)
    data = buf.getvalue()
    processor = transformers.Qwen2VLImageProcessorPil()
    cfg = qi.QwenImageConfig.from_hf(processor.to_dict())
    got, grid = qi.load_and_preprocess(data, cfg)
    expected, expected_grid = _expected(processor, ImageOps.exif_transpose(Image.open(io.BytesIO(data))))
    assert grid == expected_grid and grid[1] > grid[2]  # stored 400 wide, shown 240 wide
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_rows_are_merge_blocks_of_patches():
    """Rows 0..3 are the top-left 2×2 patches (row-major inside the block); each row repeats its patch
    over the two frames."""
    cfg = qi.QwenImageConfig(patch_size=2, merge_size=2, temporal_patch_size=2)
    x = np.arange(8 * 8 * 3, dtype=np.float32).reshape(8, 8, 3)
    rows = qi.patchify(x, cfg).reshape(16, 3, 2, 2, 2)  # (C, T, P, P)
    for r, (i, j) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        patch = x[2 * i:2 * i + 2, 2 * j:2 * j + 2].transpose(2, 0, 1)
        np.testing.assert_array_equal(rows[r, :, 0], patch)
        np.testing.assert_array_equal(rows[r, :, 1], patch)
    np.testing.assert_array_equal(rows[4, :, 0], x[0:2, 4:6].transpose(2, 0, 1))  # the next block to the right


@pytest.mark.parametrize("size", [(1, 1), (28, 28), (37, 4000), (3000, 2000), (10000, 60)])
def test_smart_resize_bounds(size):
    h, w = qi.smart_resize(*size, factor=28, min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
    assert h % 28 == 0 and w % 28 == 0 and 56 * 56 <= h * w <= 28 * 28 * 1280
    assert (h, w) == transformers.models.qwen2_vl.image_processing_pil_qwen2_vl.smart_resize(*size)


def test_extreme_aspect_ratio_and_budget_override():
    with pytest.raises(ValueError, match="aspect ratio above 200"):
        qi.smart_resize(10, 2500, factor=28, min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
    saved = transformers.Qwen2VLImageProcessorPil().to_dict()
    cfg = qi.QwenImageConfig.from_hf(saved, max_pixels=128 * 28 * 28)
    # 600 × 512 shrinks by sqrt(600·512 / budget) and floors to multiples of 28: 336 × 280, 120 merged tokens
    assert cfg.max_pixels == 128 * 28 * 28 and qi.grid(600, 512, cfg) == (1, 24, 20)
    with pytest.raises(ValueError, match="is not 'Qwen2VLImageProcessor'"):
        qi.QwenImageConfig.from_hf({"image_processor_type": "SiglipImageProcessor"})
