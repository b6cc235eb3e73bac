"""Patch buffers: how the any-resolution families (Qwen2.5-VL and those built on its pipeline) carry a
row's images in a batch — the row's patches one after another in a buffer of a bucketed length N, with
per-patch metadata (`patch_image`: the image within the row, −1 = padding; `patch_row`, `patch_col`: the
patch's place in its image's grid)."""

from __future__ import annotations

import numpy as np

KEYS = ("patches", "patch_image", "patch_row", "patch_col")  # float32[B, N, C·T·P·P], then int32[B, N] each
PAD = {"patch_image": -1}  # what a padding patch holds besides zeros
DEFAULT_BUCKETS = (256, 1024, 4096, 16384)


def pad(batch: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
    """A batch's patch buffers padded at the end to `length` patches (padding: image −1)."""
    if "patches" not in batch or batch["patches"].shape[1] == length:
        return batch
    extra = length - batch["patches"].shape[1]
    if extra < 0:
        raise ValueError(f"cannot pad patch buffers of {batch['patches'].shape[1]} to {length}")
    out = dict(batch)
    out["patches"] = np.pad(batch["patches"], ((0, 0), (0, extra), (0, 0)))
    for key in KEYS[1:]:
        out[key] = np.pad(batch[key], ((0, 0), (0, extra)), constant_values=PAD.get(key, 0))
    return out
