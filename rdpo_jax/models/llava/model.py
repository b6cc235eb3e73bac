"""The LLaVA composition: vision tower → MLP projector → image features spliced into the text sequence.

Matches transformers' `LlavaForConditionalGeneration`. The attribute tree mirrors transformers' module
names so that `models/hf.py` maps weights by renaming leaves and prefixes only (`HF_READ`, `HF_WRITE`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rdpo_jax.models import layers
from rdpo_jax.models.config import RunSettings
from rdpo_jax.models.layers import Linear
from rdpo_jax.models.llava.config import LlavaConfig
from rdpo_jax.models.text import TextDecoder
from rdpo_jax.models.vision import VisionTower
from rdpo_jax.models.vlm import Features, VisionLanguageModel

# Checkpoint names (`models/hf.py`): on-disk patterns -> canonical, applied in order, each at most once
# (llava-hf Hub / transformers 4.x, and the ≥ 4.52 in-memory names), and the Hub prefixes we write.
HF_READ = (
    (r"^model\.language_model\.", "language_model."),
    (r"^language_model\.model\.", "language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^model\.vision_tower\.", "vision_tower."),
    (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
    (r"^vision_tower\.vision_model\.", "vision_tower."),
)
HF_WRITE = (("language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
            ("vision_tower.", "vision_tower.vision_model."), ("multi_modal_projector.", "multi_modal_projector."))


class Projector(nnx.Module):
    """LLaVA's 2-layer MLP from (concatenated) vision features to the text width."""

    def __init__(self, cfg: LlavaConfig, run: RunSettings, *, rngs: layers.InitKeys):
        d = cfg.text.hidden_size
        kw = dict(bias=cfg.projector_bias, param_dtype=run.param_dtype, dtype=run.dtype, rngs=rngs)
        self.linear_1 = Linear(cfg.projector_in, d, ("embed", "mlp"), **kw)
        self.linear_2 = Linear(d, d, ("mlp", "embed"), **kw)
        self.act = layers.activation(cfg.projector_hidden_act)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(self.act(self.linear_1(x)))


class Llava(VisionLanguageModel):
    """LLaVA: `images` = pixels float32[B, H, W, 3] or float32[B, N, H, W, 3] (N images per row, filling
    the row's placeholders in order), NHWC and normalized as the HF image processor does; the batch
    field is `pixel_values`. Every image gives `config.image_seq_len` features. See `VisionLanguageModel`."""

    def __init__(self, cfg: LlavaConfig, run: RunSettings = RunSettings(), *, rngs: layers.InitKeys):
        self.vision_tower = VisionTower(cfg.vision, param_dtype=run.param_dtype, dtype=run.dtype,
                                        remat=run.remat, attention=run.attention,
                                        scan=run.scan(cfg.vision.num_layers), rngs=rngs)
        self.multi_modal_projector = Projector(cfg, run, rngs=rngs)
        self.language_model = TextDecoder(cfg.text, param_dtype=run.param_dtype, dtype=run.dtype,
                                          remat=run.remat, attention=run.attention,
                                          scan=run.scan(cfg.text.num_layers), rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.text.hidden_size, cfg.text.vocab_size, ("embed", "vocab"), bias=False,
                                  param_dtype=run.param_dtype, dtype=run.dtype, rngs=rngs)
        self.config, self.run = cfg, run

    @staticmethod
    def images_of(batch: dict):
        """`pixel_values`, with `num_images` int32[B] when rows hold fewer images than N (blank ones after)."""
        if "pixel_values" not in batch:
            return None
        if "num_images" in batch:
            return batch["pixel_values"], batch["num_images"]
        return batch["pixel_values"]

    def image_features(self, images) -> Features:
        """float[B, (N,) H, W, C], or (those pixels, num_images int32[B]) -> (projected features
        float[B, N·F, D], counts int32[B] = num_images·F, default N·F)."""
        cfg = self.config
        pixel_values, num_images = images if isinstance(images, tuple) else (images, None)
        if pixel_values.ndim == 4:
            pixel_values = pixel_values[:, None]
        B, N = pixel_values.shape[:2]
        hidden = self.vision_tower(pixel_values.reshape(B * N, *pixel_values.shape[2:]), cfg.feature_layers)
        if cfg.vision_feature_select_strategy == "default":
            hidden = [h[:, 1:] for h in hidden]
        feats = self.multi_modal_projector(jnp.concatenate(hidden, axis=-1))
        F = feats.shape[1]
        feats = feats.reshape(B, N * F, feats.shape[2])
        if num_images is None:
            return Features(feats, jnp.full((B,), N * F, jnp.int32))
        return Features(feats, (num_images * F).astype(jnp.int32))
