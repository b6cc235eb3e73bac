"""Which image adapter a model takes: how a model family's images become batch arrays (host side, numpy;
picklable for Grain workers).

Each family's folder has its adapter (`models/llava/inputs.py`: one fixed size per image;
`models/qwen2_5_vl/inputs.py`: any size, in patch buffers), which provides:

  mrope                   whether prompts carry 3D positions (M-RoPE) from the adapter
  prepare(blobs)          a record's images decoded and preprocessed, as a dict with per-image
                          `tokens` (the placeholders each expands to); None for none. ImageError names
                          the bad image's index, ImageBudgetError the budget it exceeds (`data/images.py`)
  positions(prompt, p)    the prompt's positions int32[3, P] for M-RoPE families, else None
  collate(rows, slots)    (batch arrays, counts) of the rows' prepared images; the arrays are what the
                          model's `images_of` reads

Rows may hold different numbers of images (0, 1, 2, … up to `max_images`); `None` is a row without images
(text-only records and the pipeline's padding rows); `data.images.merge` joins several records' for a row
they share.
"""

from __future__ import annotations

from collections.abc import Sequence

from rdpo_jax.data import images
from rdpo_jax.models import families


def for_model(model_config, folder: str | None, *, max_images: int, max_pixels: int | None = None,
              patch_buckets: Sequence[int] | None = None):
    """The adapter of a model (its architecture config) whose image processor config is in `folder` (read
    only if `max_images` > 0; `folder` None: the architecture's image shapes, all an ahead-of-time compile
    needs). `max_pixels` overrides the folder's pixel budget per image (any-resolution families);
    `patch_buckets`: the patch buffer lengths (`batch.DEFAULT_PATCH_BUCKETS` if None)."""
    processor, where = images.processor_dict(folder) if max_images and folder is not None else (None, "")
    return families.of(model_config).image_input(model_config, processor, where, max_images=max_images,
                                                 max_pixels=max_pixels, patch_buckets=patch_buckets)


def from_config(config, model_config):
    """The adapter of a run config (`data.max_images`, `data.max_pixels`, `data.patch_buckets`) for the
    model of `config.model.path`."""
    d = config.data
    return for_model(model_config, config.model.path, max_images=d.max_images, max_pixels=d.max_pixels,
                     patch_buckets=tuple(d.patch_buckets))
