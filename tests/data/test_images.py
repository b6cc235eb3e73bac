"""Image preprocessing equals transformers' SigLIP / CLIP image processors (PIL backend)."""

import io

import numpy as np
import pytest
import transformers
from PIL import Image

from rdpo_jax import testing
from rdpo_jax.data import images

SIGLIP = dict(size={"height": 384, "width": 384})
CLIP = dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})


def _images():
    rng = np.random.default_rng(0)
    out = {}
    for name, (w, h) in {"wide": (500, 300), "tall": (180, 410), "small": (50, 40), "square": (384, 384)}.items():
        out[f"rgb-{name}"] = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    rgba = rng.integers(0, 256, (200, 300, 4), dtype=np.uint8)
    out["rgba"] = Image.fromarray(rgba, "RGBA")
    out["gray"] = Image.fromarray(rng.integers(0, 256, (120, 100), dtype=np.uint8), "L")
    palette = out["rgb-wide"].convert("P")
    out["palette"] = palette
    transparent = palette.copy()
    transparent.info["transparency"] = 3
    out["palette-transparent"] = transparent
    return out


@pytest.mark.parametrize("family,kwargs", [
    ("siglip", SIGLIP), ("clip", CLIP),
    ("siglip", dict(size={"height": 224, "width": 160}, image_mean=(0.1, 0.2, 0.3), image_std=(0.3, 0.2, 0.1)))])
def test_matches_transformers(family, kwargs):
    cls = transformers.SiglipImageProcessorPil if family == "siglip" else transformers.CLIPImageProcessorPil
    processor = cls(**kwargs)
    cfg = images.ImageConfig.from_hf(processor.to_dict())
    for name, image in _images().items():
        expected = processor(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        got = images.preprocess(image, cfg)
        assert got.dtype == np.float32 and got.shape == expected.shape == (*cfg.output_size, 3), name
        assert np.abs(got - expected).max() <= 1e-5, name


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))  # fully transparent
    np.testing.assert_array_equal(np.asarray(images.to_rgb(rgba)), 255)


def test_image_config_from_saved_processors(tmp_path, tiny_llava):
    transformers.CLIPImageProcessorPil(**CLIP).save_pretrained(tmp_path)
    cfg = images.image_config(str(tmp_path))
    assert cfg.shortest_edge == 336 and cfg.crop == (336, 336) and cfg.output_size == (336, 336)
    assert cfg.image_mean == pytest.approx(transformers.CLIPImageProcessorPil().image_mean)
    folder, _ = tiny_llava("siglip_qwen2")  # LlavaProcessor: processor_config.json with an image_processor entry
    assert images.image_config(folder).output_size == (32, 32)
    with pytest.raises(FileNotFoundError, match="no image processor config"):
        images.image_config(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="image_processor_type 'ViTImageProcessor' is not supported"):
        images.ImageConfig.from_hf({"image_processor_type": "ViTImageProcessor"})


def test_exif_orientation_is_honoured():
    image = Image.fromarray(np.zeros((20, 60, 3), np.uint8))  # 60 wide, 20 tall
    exif = image.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif)
    assert images.decode_image(buf.getvalue()).size == (20, 60)


@pytest.mark.parametrize("data", [b"", b"not an image at all", None])
def test_undecodable_bytes(data):
    if data is None:  # a truncated PNG
        data = testing.png(np.random.default_rng(0), (64, 64))[:-40]
    with pytest.raises(images.ImageError, match="cannot decode image"):
        images.load_and_preprocess(data, images.ImageConfig(height=8, width=8))
