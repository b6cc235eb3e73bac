"""Qwen2.5-VL's images in a batch: any size, resized within the pixel budget (`images.smart_resize`),
h·w/m² placeholders for a (1, h, w) patch grid. A batch holds one patch buffer per row (`rdpo_jax/batch.py`),
the row's images one after another; N is the smallest of `patch_buckets` that holds the batch's fullest
row, so a handful of programs serve every mix of image sizes. The prompt's positions are 3D (M-RoPE,
`positions.rope_index`). The adapter protocol is `models/image_inputs.py`'s."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rdpo_jax import batch
from rdpo_jax.data import images
from rdpo_jax.models.qwen2_5_vl import images as qwen_images
from rdpo_jax.models.qwen2_5_vl import positions


class QwenPatches:
    mrope = True  # the prompt's 3D positions come with it

    def __init__(self, config: qwen_images.QwenImageConfig | None, *, image_token_id: int, max_images: int,
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
        out = images.load_all(blobs, lambda b: qwen_images.load_and_preprocess(b, self.config), self.max_images)
        if not out:
            return None
        grids = [g for _, g in out]
        total = sum(t * h * w for t, h, w in grids)
        if total > self.buckets[-1]:
            raise images.ImageBudgetError(
                f"{len(grids)} images of {total} patches (grids {grids}) exceed the largest patch bucket, "
                f"{self.buckets[-1]}; raise data.patch_buckets or lower data.max_pixels (now "
                f"{self.config.max_pixels} per image)", "image_budget")
        m2 = self.config.merge_size ** 2
        return {"patches": np.concatenate([p for p, _ in out]), "grids": grids,
                "tokens": [t * h * w // m2 for t, h, w in grids]}

    def positions(self, prompt: np.ndarray, prepared: dict | None) -> np.ndarray:
        """int32[3, P]: the prompt's M-RoPE positions (text-only prompts: three equal rows)."""
        types = (np.asarray(prompt) == self.image_token_id).astype(np.int32)
        grids = prepared["grids"] if prepared else []
        merge = self.config.merge_size if self.config else 2
        return positions.rope_index(types, grids, merge_size=merge)[0]

    def collate(self, rows: Sequence[dict | None], slots: int | None = None
                ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """(batch arrays, counts) of the rows' images; `slots` = 0: no arrays (see FixedImages)."""
        if not (self.max_images if slots is None else slots):
            return {}, {}
        need = max((len(r["patches"]) for r in rows if r is not None), default=0)
        n = next(b for b in self.buckets if b >= need)
        out = {"patches": np.zeros((len(rows), n, self.config.patch_dim), np.float32),
               **{k: np.zeros((len(rows), n), np.int32) for k in batch.PATCH_KEYS[1:]}}
        out["patch_image"][:] = batch.PATCH_PAD["patch_image"]
        for b, r in enumerate(rows):
            if r is None:
                continue
            meta = qwen_images.patch_metadata(r["grids"], self.config.merge_size, n)
            out["patches"][b, :len(r["patches"])] = r["patches"]
            for key, field in (("patch_image", "image"), ("patch_row", "row"), ("patch_col", "col")):
                out[key][b] = meta[field]
        real = int((out["patch_image"] >= 0).sum())
        return out, {"patches": real, "patch_slots": out["patch_image"].size}


def image_input(cfg, processor: dict | None, where: str, *, max_images: int, max_pixels: int | None = None,
                patch_buckets: Sequence[int] | None = None) -> QwenPatches:
    """The adapter for `cfg` (a `QwenVLConfig`) and its folder's image processor settings (`processor`, read
    from `where`; `max_pixels` overrides its pixel budget per image); `processor` None: the architecture's
    patch shapes (all an ahead-of-time compile needs)."""
    config = None
    if max_images and processor is None:
        v = cfg.vision
        config = qwen_images.QwenImageConfig(patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
                                             merge_size=v.merge_size)
    elif max_images:
        config = qwen_images.QwenImageConfig.from_hf(processor, where, max_pixels=max_pixels)
    return QwenPatches(config, image_token_id=cfg.image_token_id, max_images=max_images,
                       patch_buckets=patch_buckets or batch.DEFAULT_PATCH_BUCKETS)
