"""Image preprocessing of the Qwen2-VL family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): any resolution, as patches.

Equal to transformers' `Qwen2VLImageProcessor` (PIL backend): decode (EXIF orientation applied) → RGB
(transparency on white) → `smart_resize` to sides that are multiples of patch_size · merge_size with an
area inside [min_pixels, max_pixels] → PIL resize → rescale → normalize → patches. Each patch row is
(C, T, P, P) flattened, the still image repeated over the T = temporal_patch_size frames the patch
embedding expects, and rows come in merge-block-major order — (h/2m, w/2m) blocks of m × m patches — so
that the 2×2 patch merger reads four consecutive rows. Decoding and RGB conversion are `images.py`'s.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

from rdpo_jax.data import images

FAMILY = "Qwen2VLImageProcessor"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class QwenImageConfig:
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56  # the processor's size["shortest_edge"]: an area, not an edge
    max_pixels: int = 28 * 28 * 1280  # size["longest_edge"]: an area too
    resample: int = Image.Resampling.BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    do_convert_rgb: bool = True

    @classmethod
    def from_hf(cls, d: dict, where: str = "image processor config", *, max_pixels: int | None = None
                ) -> QwenImageConfig:
        """A saved processor config (`preprocessor_config.json` or `processor_config.json`'s
        `image_processor`); `max_pixels` overrides the folder's pixel budget per image."""
        kind = d.get("image_processor_type", "").removesuffix("Fast").removesuffix("Pil")
        if kind != FAMILY:
            raise ValueError(f"{where}: image_processor_type {d.get('image_processor_type')!r} is not {FAMILY!r}")
        size = dict(d.get("size") or {})
        # the legacy top-level min_pixels / max_pixels win over size, as the processor's constructor does
        low = d.get("min_pixels") or size.get("shortest_edge") or cls.min_pixels
        high = max_pixels or d.get("max_pixels") or size.get("longest_edge") or cls.max_pixels
        if low > high:
            raise ValueError(f"{where}: min_pixels {low} exceeds max_pixels {high}")
        return cls(patch_size=d.get("patch_size", 14), temporal_patch_size=d.get("temporal_patch_size", 2),
                   merge_size=d.get("merge_size", 2), min_pixels=int(low), max_pixels=int(high),
                   resample=int(d.get("resample", Image.Resampling.BICUBIC)), do_resize=d.get("do_resize", True),
                   do_rescale=d.get("do_rescale", True), rescale_factor=d.get("rescale_factor", 1 / 255),
                   do_normalize=d.get("do_normalize", True),
                   image_mean=tuple(d.get("image_mean", OPENAI_CLIP_MEAN)),
                   image_std=tuple(d.get("image_std", OPENAI_CLIP_STD)), do_convert_rgb=d.get("do_convert_rgb", True))

    @property
    def factor(self) -> int:
        """Both resized sides are multiples of this: one merged token covers factor × factor pixels."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size ** 2


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) after resizing: multiples of `factor`, area within [min_pixels, max_pixels], the
    aspect ratio kept as well as those allow (round to the nearest multiple; if that is too large,
    shrink both sides by the same ratio and floor; too small, grow and ceil)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image of {height}×{width}: aspect ratio above 200 (the Qwen-VL processors refuse it)")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def grid(height: int, width: int, cfg: QwenImageConfig) -> tuple[int, int, int]:
    """The (t, h, w) patch grid an image of height × width pixels becomes (`image_grid_thw`); it gives
    h·w patches and h·w / merge_size² image tokens."""
    if cfg.do_resize:
        height, width = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    return 1, height // cfg.patch_size, width // cfg.patch_size


def patchify(x: np.ndarray, cfg: QwenImageConfig) -> np.ndarray:
    """float32[H, W, C] (sides multiples of `cfg.factor`) → float32[H/P · W/P, C·T·P·P] in
    merge-block-major order."""
    H, W, C = x.shape
    P, m, T = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = H // P, W // P
    blocks = x.transpose(2, 0, 1).reshape(C, gh // m, m, P, gw // m, m, P).transpose(1, 4, 2, 5, 0, 3, 6)
    frames = np.broadcast_to(blocks[:, :, :, :, :, None], (*blocks.shape[:5], T, P, P))  # (.., C, T, P, P)
    return np.ascontiguousarray(frames.reshape(gh * gw, C * T * P * P), dtype=np.float32)


def preprocess(image: Image.Image, cfg: QwenImageConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One image → (patches float32[N, C·T·P·P], its grid (1, h, w) with h·w = N)."""
    if cfg.do_convert_rgb:
        image = images.to_rgb(image)
    _, gh, gw = grid(image.height, image.width, cfg)
    height, width = gh * cfg.patch_size, gw * cfg.patch_size
    if cfg.do_resize:
        image = image.resize((width, height), resample=cfg.resample)
    elif height != image.height or width != image.width:
        raise ValueError(f"image of {image.height}×{image.width} with do_resize=False: the sides must be multiples "
                         f"of {cfg.factor}")
    x = np.asarray(image)
    if x.ndim == 2:
        x = x[..., None]
    return patchify(images.rescale_and_normalize(x, cfg), cfg), (1, gh, gw)


def patch_metadata(grids, merge_size: int, num_patches: int) -> dict[str, np.ndarray]:
    """Host-side metadata of a patch buffer holding `grids` ((1, h, w) per image, in order) padded to
    `num_patches`: image int32[N] (−1 = padding), row, col int32[N] (the patch's place in its image's grid,
    merge-block-major as the rows are)."""
    image, row, col = (np.full(num_patches, v, np.int32) for v in (-1, 0, 0))
    start, m = 0, merge_size
    for i, (t, h, w) in enumerate(grids):
        if t != 1 or h % m or w % m:
            raise ValueError(f"image {i}: grid {(t, h, w)} must be a still image with sides multiples of {m}")
        r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = (h // m, m, w // m, m)
        n = h * w
        if start + n > num_patches:
            raise ValueError(f"images of {sum(g[1] * g[2] for g in grids)} patches exceed the buffer of {num_patches}")
        image[start:start + n] = i
        row[start:start + n] = r.reshape(block).transpose(0, 2, 1, 3).ravel()
        col[start:start + n] = c.reshape(block).transpose(0, 2, 1, 3).ravel()
        start += n
    return dict(image=image, row=row, col=col)


def load_and_preprocess(data: bytes, cfg: QwenImageConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    return preprocess(images.decode_image(data), cfg)


def save_processor(folder: str, tok, *, patch_size: int = 4, pixels: tuple[int, int] | int = (8 * 8, 48 * 48),
                   processor_class: str = "Qwen2_5_VLProcessor") -> None:
    """Writes the files of a `processor_class` (Qwen2_5_VLProcessor, Qwen3VLProcessor) with patches of `patch_size` (merged 2×2) to `folder`:
    preprocessor_config.json, the tokenizer `tok` and its chat template.
    `pixels`: the (min, max) pixel budget per image, or one area (every image resized to it). (transformers
    5.23 builds that processor only with torchvision installed, for its video processor; the processor's
    own files are written without it, and `AutoProcessor` reads them where torchvision is.)"""
    import json
    import os

    import transformers

    low, high = (pixels, pixels) if isinstance(pixels, int) else pixels
    image_processor = transformers.Qwen2VLImageProcessorPil(patch_size=patch_size, merge_size=2, temporal_patch_size=2,
                                                            min_pixels=low, max_pixels=high)
    image_processor.save_pretrained(folder)
    path = os.path.join(folder, "preprocessor_config.json")
    with open(path) as f:
        d = json.load(f)
    d["processor_class"] = processor_class
    with open(path, "w") as f:
        json.dump(d, f, indent=2)
    tok.save_pretrained(folder)
