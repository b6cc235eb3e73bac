"""Images on the host: decoding, the budget errors and helpers every family's image adapter shares
(`load_all`, `merge`), and preprocessing equal to Hugging Face's SigLIP / CLIP image processors (PIL path):

decode (EXIF orientation applied) → RGB (transparency composited on white) → resize (exact size, or
shortest edge keeping the aspect ratio) → center crop → rescale → normalize → float32[H, W, 3] (NHWC).
The arithmetic follows transformers' PIL backend step for step (uint8 PIL resize, float64 rescale then
float32, per-channel normalize), so outputs agree to float32 rounding.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

FAMILIES = ("SiglipImageProcessor", "CLIPImageProcessor")


class ImageError(ValueError):
    """Image bytes that cannot be decoded; `index`, when set, is the image's place in its record."""

    index: int | None = None


class ImageBudgetError(ValueError):
    """A row's images do not fit the configured budget; `reason` is the pipeline's skip reason
    ("image_count": more than data.max_images; "image_budget": more patches than the largest bucket)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def load_all(blobs, preprocess, max_images: int) -> list:
    """`preprocess(blob)` of each of a record's images: ImageBudgetError if there are more than
    `max_images`, an ImageError whose `index` names the image that fails."""
    if len(blobs) > max_images:
        raise ImageBudgetError(f"{len(blobs)} images, more than data.max_images={max_images}", "image_count")
    out = []
    for i, blob in enumerate(blobs):
        try:
            out.append(preprocess(blob))
        except (ImageError, ValueError) as e:
            error = ImageError(str(e))
            error.index = i
            raise error from None
    return out


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    height: int | None = None  # exact resize target (SigLIP) …
    width: int | None = None
    shortest_edge: int | None = None  # … or shortest-edge resize keeping the aspect ratio (CLIP)
    crop: tuple[int, int] | None = None  # center crop (height, width)
    resample: int = Image.Resampling.BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    do_convert_rgb: bool = True

    @classmethod
    def from_hf(cls, d: dict, where: str = "image processor config") -> ImageConfig:
        kind = d.get("image_processor_type", "").removesuffix("Fast").removesuffix("Pil")
        if kind not in FAMILIES:
            raise ValueError(f"{where}: image_processor_type {d.get('image_processor_type')!r} is not supported; "
                             f"supported: {FAMILIES}")
        size = d.get("size") or {}
        crop = d.get("crop_size") if d.get("do_center_crop") else None
        return cls(height=size.get("height"), width=size.get("width"), shortest_edge=size.get("shortest_edge"),
                   crop=(crop["height"], crop["width"]) if crop else None,
                   resample=int(d.get("resample", Image.Resampling.BICUBIC)), do_resize=d.get("do_resize", True),
                   do_rescale=d.get("do_rescale", True), rescale_factor=d.get("rescale_factor", 1 / 255),
                   do_normalize=d.get("do_normalize", True), image_mean=tuple(d.get("image_mean", (0.5,) * 3)),
                   image_std=tuple(d.get("image_std", (0.5,) * 3)), do_convert_rgb=d.get("do_convert_rgb", True))

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of every output; batching needs one fixed size."""
        if self.crop:
            return self.crop
        if self.height and self.width:
            return self.height, self.width
        raise ValueError("a shortest-edge resize without center crop gives images of varying size")


def processor_dict(model_folder: str) -> tuple[dict, str]:
    """(the image processor settings saved with a model, the file they came from): `preprocessor_config.json`,
    or the `image_processor` entry of transformers 5's `processor_config.json`."""
    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        path = os.path.join(model_folder, name)
        if os.path.exists(path):
            with open(path) as f:
                d = json.load(f)
            d = d.get(key, d) if key else d
            if "image_processor_type" in d:
                return d, path
    raise FileNotFoundError(f"{model_folder}: no image processor config (preprocessor_config.json or "
                            "processor_config.json)")


def image_config(model_folder: str) -> ImageConfig:
    """The fixed-size image processor settings saved with a model (`processor_dict`)."""
    return ImageConfig.from_hf(*processor_dict(model_folder))


def decode_image(data: bytes) -> Image.Image:
    """Decodes (fully, so truncated files fail here) and applies the EXIF orientation."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return ImageOps.exif_transpose(image)
    except Exception as e:  # PIL raises many exception types for bad input
        raise ImageError(f"cannot decode image ({type(e).__name__}: {e})") from e


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB; any transparency (alpha band or palette transparency) is composited onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _resize_target(height: int, width: int, cfg: ImageConfig) -> tuple[int, int]:
    if cfg.shortest_edge:
        short, long = sorted((height, width))
        new_long = int(cfg.shortest_edge * long / short)
        return (cfg.shortest_edge, new_long) if height <= width else (new_long, cfg.shortest_edge)
    return cfg.height, cfg.width


def _center_crop(x: np.ndarray, crop: tuple[int, int]) -> np.ndarray:
    """x [H, W, C]; pads with zeros (centred) where the image is smaller than the crop."""
    h, w = x.shape[:2]
    ch, cw = crop
    ph, pw = max(ch - h, 0), max(cw - w, 0)
    if ph or pw:
        x = np.pad(x, ((-(-ph // 2), ph - (-(-ph // 2))), (-(-pw // 2), pw - (-(-pw // 2))), (0, 0)))
        h, w = x.shape[:2]
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[top:top + ch, left:left + cw]


def preprocess(image: Image.Image, cfg: ImageConfig) -> np.ndarray:
    """One image → float32[H, W, 3], as the family's HF image processor computes it."""
    if cfg.do_convert_rgb:
        image = to_rgb(image)
    if cfg.do_resize:
        height, width = _resize_target(image.height, image.width, cfg)
        image = image.resize((width, height), resample=cfg.resample)
    x = np.asarray(image)
    if x.ndim == 2:
        x = x[..., None]
    if cfg.crop:
        x = _center_crop(x, cfg.crop)
    return rescale_and_normalize(x, cfg)


def rescale_and_normalize(x: np.ndarray, cfg) -> np.ndarray:
    """uint8[H, W, C] → float32, as transformers' PIL backend: float64 rescale, then float32 per-channel
    normalize (`cfg`: do_rescale, rescale_factor, do_normalize, image_mean, image_std; any family's)."""
    if cfg.do_rescale:
        x = (x.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    x = x.astype(np.float32)
    if cfg.do_normalize:
        x = (x - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)
    return x


def load_and_preprocess(data: bytes, cfg: ImageConfig) -> np.ndarray:
    return preprocess(decode_image(data), cfg)


def merge(prepared: Sequence[dict | None]) -> dict | None:
    """The images of several records' `prepare` outputs as one row's, in order (None if none has any):
    arrays concatenated, per-image lists joined."""
    present = [p for p in prepared if p is not None]
    if not present:
        return None
    return {k: np.concatenate([p[k] for p in present]) if isinstance(v, np.ndarray) else [x for p in present for x in p[k]]
            for k, v in present[0].items()}
