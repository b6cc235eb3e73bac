"""The Qwen2.5-VL composition (transformers' `Qwen2_5_VLForConditionalGeneration`): the vision tower's
merged patch features spliced over the `<|image_pad|>` placeholders of a Qwen2 decoder with M-RoPE.

Images are any size: per batch row the patches of the row's images are packed into one buffer (a static
length per bucket) with per-patch metadata (`QwenImages`), so rows hold different numbers of image
tokens. Rows with images need their 3D positions (`positions.rope_index`); text-only rows may pass 1D
positions. Attribute names follow transformers 5's modules (`visual`, `language_model`, `lm_head`) so
that `models/hf.py` maps weights by renaming leaves and prefixes only (`HF_READ`, `HF_WRITE`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rdpo_jax.models import layers
from rdpo_jax.models.config import RunSettings
from rdpo_jax.models.layers import Linear
from rdpo_jax.models.qwen2_5_vl.config import QwenVLConfig
from rdpo_jax.models.qwen2_5_vl.vision import QwenVisionTower
from rdpo_jax.models.text import TextDecoder
from rdpo_jax.models.vlm import Features, VisionLanguageModel

# Checkpoint names (`models/hf.py`): the Hub's `visual.*`/`model.*` and transformers 5's own
# `model.visual.*`/`model.language_model.*` read; the Hub layout written.
HF_READ = ((r"^model\.visual\.", "visual."), (r"^model\.language_model\.", "language_model."),
           (r"^model\.", "language_model."))
HF_WRITE = (("visual.", "visual."), ("language_model.", "model."), ("lm_head.", "lm_head."))
BATCH_KEYS = ("patches", "patch_image", "patch_row", "patch_col")  # QwenImages' fields in a batch dict


class QwenImages(NamedTuple):
    """A row's images as one patch buffer (`images.patch_metadata` builds the metadata)."""
    patches: jax.Array  # float32[B, N, C·T·P·P], merge-block-major per image, padding at the end
    image: jax.Array  # int32[B, N]: the patch's image within its row (in placeholder order), −1 = padding
    row: jax.Array  # int32[B, N]: the patch's row in its image's patch grid
    col: jax.Array  # int32[B, N]

    @classmethod
    def from_batch(cls, batch: dict) -> QwenImages | None:
        """The fields from a batch dict (`BATCH_KEYS`), None when it holds no patches."""
        return cls(*(batch[k] for k in BATCH_KEYS)) if "patches" in batch else None


class QwenVL(VisionLanguageModel):
    """Qwen2.5-VL: `images` = `QwenImages`; every image of grid (1, h, w) gives h·w/4 features, written over
    its placeholders in order. See `VisionLanguageModel`."""

    tower = QwenVisionTower  # the vision tower's class (Qwen3-VL subclasses with its own)
    decoder = TextDecoder  # the text decoder's class (Qwen3.5: a hybrid of Gated DeltaNet and attention)

    def __init__(self, cfg: QwenVLConfig, run: RunSettings = RunSettings(), *, rngs: layers.InitKeys):
        kw = dict(param_dtype=run.param_dtype, dtype=run.dtype, rngs=rngs)
        self.visual = self.tower(cfg.vision, remat=run.remat, attention=run.attention,
                                 scan=run.scan(cfg.vision.depth), **kw)
        self.language_model = self.decoder(cfg.text, remat=run.remat, attention=run.attention,
                                          scan=run.scan(cfg.text.num_layers), **kw)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.text.hidden_size, cfg.text.vocab_size, ("embed", "vocab"), bias=False, **kw)
        self.config, self.run = cfg, run

    images_of = staticmethod(QwenImages.from_batch)

    def image_features(self, images: QwenImages) -> Features:
        """(features float[B, N/4, D] in patch order, counts int32[B] = the row's real patches / 4)."""
        return Features(self.visual(images.patches, images.image, images.row, images.col), self.counts(images))

    def counts(self, images: QwenImages) -> jax.Array:
        """int32[B]: each row's image features, its real patches / merge²."""
        return ((images.image >= 0).sum(axis=1) // self.config.vision.merge_size ** 2).astype(jnp.int32)
