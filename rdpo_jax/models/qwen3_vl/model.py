"""The Qwen3-VL composition (transformers' `Qwen3VLForConditionalGeneration`): the vision tower's merged
patch features spliced over the `<|image_pad|>` placeholders of a Qwen3 decoder with interleaved M-RoPE,
and DeepStack — the features of the tower's `deepstack_visual_indexes` blocks, merged by their own
mergers, added to the decoder's hidden states at the placeholders after its first layers (level k after
layer k: `VisionLanguageModel.decode`, inside the layer scan as one more step of its body).

Images, patch buffers and 3D positions are Qwen2.5-VL's (`QwenImages`, `qwen2_5_vl/positions.py`).
"""

from __future__ import annotations

from rdpo_jax.models.qwen2_5_vl.model import QwenImages, QwenVL
from rdpo_jax.models.qwen3_vl.vision import Qwen3VisionTower
from rdpo_jax.models.vlm import Features

# Checkpoint names (`models/hf.py`): the Hub and transformers 5 both keep `model.visual.*`,
# `model.language_model.*` and `lm_head.*`.
HF_READ = ((r"^model\.visual\.", "visual."), (r"^model\.language_model\.", "language_model."))
HF_WRITE = (("visual.", "model.visual."), ("language_model.", "model.language_model."), ("lm_head.", "lm_head."))


class Qwen3VL(QwenVL):
    """Qwen3-VL: `images` = `QwenImages`; every image of grid (1, h, w) gives h·w/4 features, written over
    its placeholders in order, and as many per DeepStack level. See `VisionLanguageModel`."""

    tower = Qwen3VisionTower

    def image_features(self, images: QwenImages) -> Features:
        """Features float[B, N/4, D] in patch order, counts int32[B] (the row's real patches / 4), and the
        DeepStack levels float[B, K, N/4, D]."""
        feats, deepstack = self.visual(images.patches, images.image, images.row, images.col)
        return Features(feats, self.counts(images), deepstack)
