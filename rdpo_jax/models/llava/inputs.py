"""LLaVA's images in a batch: every image resized/cropped to one size (`data/images.py`, the SigLIP / CLIP
processors), `tokens_per_image` placeholders each. A batch holds `pixel_values` float32[B, N, H, W, 3] with
N = `max_images` (a row with fewer images is filled with blank ones, encoded and never spliced) and
`num_images` int32[B]. The adapter protocol is `models/image_inputs.py`'s."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rdpo_jax.data import images


class FixedImages:
    mrope = False  # 1D positions: packing counts them

    def __init__(self, config: images.ImageConfig | None, *, tokens_per_image: int, max_images: int):
        if max_images and config is None:
            raise ValueError("images need the model folder's image processor config")
        self.config, self.tokens_per_image, self.max_images = config, tokens_per_image, max_images

    def prepare(self, blobs: Sequence[bytes]) -> dict | None:
        """Decodes and preprocesses a record's images (ImageError names the bad one's index)."""
        pixels = images.load_all(blobs, lambda b: images.load_and_preprocess(b, self.config), self.max_images)
        if not pixels:
            return None
        return {"pixels": np.stack(pixels), "tokens": [self.tokens_per_image] * len(blobs)}

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


def image_input(cfg, processor: dict | None, where: str, *, max_images: int, max_pixels: int | None = None,
                patch_buckets: Sequence[int] | None = None) -> FixedImages:
    """The adapter for `cfg` (a `LlavaConfig`) and its folder's image processor settings (`processor`,
    read from `where`); `processor` None: the architecture's image size (all an ahead-of-time compile needs)."""
    del patch_buckets  # one size per image: no patch buffers
    if max_pixels is not None:
        raise ValueError("data.max_pixels: only any-resolution families (Qwen2.5-VL) have a pixel budget; "
                         "this model resizes every image to one size")
    size = cfg.vision.image_size
    config = None if not max_images else (images.ImageConfig(height=size, width=size) if processor is None
                                          else images.ImageConfig.from_hf(processor, where))
    return FixedImages(config, tokens_per_image=cfg.image_seq_len, max_images=max_images)
