"""How a model family's images become batch arrays (host side, numpy; picklable for Grain workers).

Per image: preprocessing and the number of placeholder tokens the chat template's image token expands
to. Per batch: the arrays the model's `images_of` reads. Rows may hold different numbers of images
(0, 1, 2, … up to `max_images`).

  FixedImages (LLaVA): every image resized/cropped to one size, `tokens_per_image` placeholders each. A
    batch holds `pixel_values` float32[B, N, H, W, 3] with N = `max_images` (a row with fewer images is
    filled with blank ones, encoded and never spliced) and `num_images` int32[B].
  QwenPatches (Qwen2-VL family): any size, resized within the pixel budget (`smart_resize`), h·w/m²
    placeholders for a (1, h, w) patch grid. A batch holds one patch buffer per row: `patches`
    float32[B, N, C·T·P·P], the row's images one after another, with per-patch `patch_image` (−1 =
    padding), `patch_row`, `patch_col` int32[B, N]; N is the smallest of `patch_buckets` that holds the
    batch's fullest row, so a handful of programs serve every mix of image sizes. The prompt's
    positions are 3D (M-RoPE, `qwen_vl_positions.rope_index`).

A prepared example's images are a dict (`prepare`) that `collate` stacks; `None` is a row without images
(text-only records and the pipeline's padding rows); `merge` joins several records' for a row they share.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rdpo_jax.data import images, qwen_vl_images, qwen_vl_positions

PATCH_KEYS = ("patches", "patch_image", "patch_row", "patch_col")
PATCH_PAD = {"patch_image": -1}  # what a padding patch holds besides zeros


class ImageBudgetError(ValueError):
    """A row's images do not fit the configured budget; `reason` is the pipeline's skip reason
    ("image_count": more than data.max_images; "image_budget": more patches than the largest bucket)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class FixedImages:
    mrope = False  # 1D positions: packing counts them

    def __init__(self, config: images.ImageConfig | None, *, tokens_per_image: int, max_images: int):
        if max_images and config is None:
            raise ValueError("images need the model folder's image processor config")
        self.config, self.tokens_per_image, self.max_images = config, tokens_per_image, max_images

    def prepare(self, blobs: Sequence[bytes]) -> dict | None:
        """Decodes and preprocesses a record's images (ImageError names the bad one's index)."""
        _check_count(len(blobs), self.max_images)
        if not blobs:
            return None
        return {"pixels": np.stack([_load(i, b, lambda b: images.load_and_preprocess(b, self.config))
                                    for i, b in enumerate(blobs)]),
                "tokens": [self.tokens_per_image] * len(blobs)}

    def positions(self, prompt: np.ndarray, prepared: dict | None) -> None:
        return None

    def collate(self, rows: Sequence[dict | None], slots: int | None = None
                ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """(batch arrays, counts) of the rows' images; `slots`: images per row in the arrays (default
        `max_images`, what training uses for one static shape); none at all (no arrays) for 0."""
        slots = self.max_images if slots is None else slots
        if not slots:
            return {}, {}
        h, w = self.config.output_size
        pixels = np.zeros((len(rows), slots, h, w, 3), np.float32)
        count = np.zeros(len(rows), np.int32)
        for b, r in enumerate(rows):
            if r is not None:
                pixels[b, :len(r["pixels"])] = r["pixels"]
                count[b] = len(r["pixels"])
        return {"pixel_values": pixels, "num_images": count}, {"images": int(count.sum()),
                                                               "image_slots": pixels.shape[0] * pixels.shape[1]}


class QwenPatches:
    mrope = True  # the prompt's 3D positions come with it

    def __init__(self, config: qwen_vl_images.QwenImageConfig | None, *, image_token_id: int, max_images: int,
                 patch_buckets: Sequence[int]):
        if max_images and config is None:
            raise ValueError("images need the model folder's image processor config")
        buckets = tuple(int(n) for n in patch_buckets)
        group = config.merge_size ** 2 if config else 4
        if not buckets or list(buckets) != sorted(set(buckets)) or any(n % group for n in buckets):
            raise ValueError(f"patch_buckets must be increasing multiples of {group}, got {list(patch_buckets)}")
        self.config, self.image_token_id, self.max_images, self.buckets = config, image_token_id, max_images, buckets

    def prepare(self, blobs: Sequence[bytes]) -> dict | None:
        """Preprocesses a record's images; ImageBudgetError if their patches exceed the largest bucket."""
        _check_count(len(blobs), self.max_images)
        if not blobs:
            return None
        out = [_load(i, b, lambda b: qwen_vl_images.load_and_preprocess(b, self.config)) for i, b in enumerate(blobs)]
        grids = [g for _, g in out]
        total = sum(t * h * w for t, h, w in grids)
        if total > self.buckets[-1]:
            raise ImageBudgetError(f"{len(grids)} images of {total} patches (grids {grids}) exceed the largest "
                                   f"patch bucket, {self.buckets[-1]}; raise data.patch_buckets or lower "
                                   f"data.max_pixels (now {self.config.max_pixels} per image)", "image_budget")
        m2 = self.config.merge_size ** 2
        return {"patches": np.concatenate([p for p, _ in out]), "grids": grids,
                "tokens": [t * h * w // m2 for t, h, w in grids]}

    def positions(self, prompt: np.ndarray, prepared: dict | None) -> np.ndarray:
        """int32[3, P]: the prompt's M-RoPE positions (text-only prompts: three equal rows)."""
        types = (np.asarray(prompt) == self.image_token_id).astype(np.int32)
        grids = prepared["grids"] if prepared else []
        merge = self.config.merge_size if self.config else 2
        return qwen_vl_positions.rope_index(types, grids, merge_size=merge)[0]

    def collate(self, rows: Sequence[dict | None], slots: int | None = None
                ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """(batch arrays, counts) of the rows' images; `slots` = 0: no arrays (see FixedImages)."""
        if not (self.max_images if slots is None else slots):
            return {}, {}
        need = max((len(r["patches"]) for r in rows if r is not None), default=0)
        n = next(b for b in self.buckets if b >= need)
        out = {"patches": np.zeros((len(rows), n, self.config.patch_dim), np.float32),
               **{k: np.zeros((len(rows), n), np.int32) for k in PATCH_KEYS[1:]}}
        out["patch_image"][:] = PATCH_PAD["patch_image"]
        for b, r in enumerate(rows):
            if r is None:
                continue
            meta = qwen_vl_images.patch_metadata(r["grids"], self.config.merge_size, n)
            out["patches"][b, :len(r["patches"])] = r["patches"]
            for key, field in (("patch_image", "image"), ("patch_row", "row"), ("patch_col", "col")):
                out[key][b] = meta[field]
        real = int((out["patch_image"] >= 0).sum())
        return out, {"patches": real, "patch_slots": out["patch_image"].size}


DEFAULT_PATCH_BUCKETS = (256, 1024, 4096, 16384)


def for_model(model_config, folder: str, *, max_images: int, max_pixels: int | None = None,
              patch_buckets: Sequence[int] | None = None):
    """The adapter for a model (its architecture config) whose image processor config is in `folder`
    (read only if `max_images` > 0). `max_pixels` overrides the folder's pixel budget per image (Qwen);
    `patch_buckets` default to `DEFAULT_PATCH_BUCKETS`."""
    from rdpo_jax.models import config as config_lib

    if isinstance(model_config, config_lib.QwenVLConfig):
        image_config = None
        if max_images:
            found, where = images.processor_dict(folder)
            image_config = qwen_vl_images.QwenImageConfig.from_hf(found, where, max_pixels=max_pixels)
        return QwenPatches(image_config, image_token_id=model_config.image_token_id, max_images=max_images,
                           patch_buckets=patch_buckets or DEFAULT_PATCH_BUCKETS)
    if max_pixels is not None:
        raise ValueError("data.max_pixels: only any-resolution families (Qwen2.5-VL) have a pixel budget; "
                         "this model resizes every image to one size")
    return FixedImages(images.image_config(folder) if max_images else None,
                       tokens_per_image=model_config.image_seq_len, max_images=max_images)


def from_config(config, model_config):
    """The adapter of a run config (`data.max_images`, `data.max_pixels`, `data.patch_buckets`) for the
    model of `config.model.path`."""
    d = config.data
    return for_model(model_config, config.model.path, max_images=d.max_images, max_pixels=d.max_pixels,
                     patch_buckets=tuple(d.patch_buckets))


def merge(prepared: Sequence[dict | None]) -> dict | None:
    """The images of several records' `prepare` outputs as one row's, in order (None if none has any):
    arrays concatenated, per-image lists joined."""
    present = [p for p in prepared if p is not None]
    if not present:
        return None
    return {k: np.concatenate([p[k] for p in present]) if isinstance(v, np.ndarray) else [x for p in present for x in p[k]]
            for k, v in present[0].items()}


def pad_patches(batch: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
    """A batch's patch buffers padded at the end to `length` patches (padding: image −1)."""
    if "patches" not in batch or batch["patches"].shape[1] == length:
        return batch
    extra = length - batch["patches"].shape[1]
    if extra < 0:
        raise ValueError(f"cannot pad patch buffers of {batch['patches'].shape[1]} to {length}")
    out = dict(batch)
    out["patches"] = np.pad(batch["patches"], ((0, 0), (0, extra), (0, 0)))
    for key in PATCH_KEYS[1:]:
        out[key] = np.pad(batch[key], ((0, 0), (0, extra)), constant_values=PATCH_PAD.get(key, 0))
    return out


def _check_count(n: int, max_images: int):
    if n > max_images:
        raise ImageBudgetError(f"{n} images, more than data.max_images={max_images}", "image_count")


def _load(i: int, blob: bytes, fn):
    """fn(blob); a failure is an ImageError whose `index` names the image."""
    try:
        return fn(blob)
    except (images.ImageError, ValueError) as e:
        error = images.ImageError(str(e))
        error.index = i
        raise error from None
