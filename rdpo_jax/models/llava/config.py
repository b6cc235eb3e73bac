"""LLaVA's architecture config, read from a transformers `LlavaConfig`."""

from __future__ import annotations

import dataclasses

import numpy as np

from rdpo_jax.models.config import TextConfig, VisionConfig, require, text_from_hf, vision_from_hf


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    """The architecture of a LLaVA-style model."""
    vision: VisionConfig
    text: TextConfig
    image_token_id: int
    projector_hidden_act: str
    projector_bias: bool
    vision_feature_layer: int | tuple[int, ...]
    vision_feature_select_strategy: str  # "default" drops the first token, "full" keeps all
    tie_word_embeddings: bool

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """Indices into the vision tower's hidden states (0 = embeddings), made non-negative."""
        layers = self.vision_feature_layer
        layers = (layers,) if isinstance(layers, int) else layers
        n = self.vision.num_layers + 1
        return tuple(i % n for i in layers)

    @property
    def image_seq_len(self) -> int:
        """Number of placeholder tokens (= projected features) per image."""
        return self.vision.num_positions - (self.vision_feature_select_strategy == "default")

    @property
    def projector_in(self) -> int:
        return self.vision.hidden_size * len(self.feature_layers)


def from_hf(hf) -> LlavaConfig:
    vision, text = vision_from_hf(hf.vision_config), text_from_hf(hf.text_config)
    layer = hf.vision_feature_layer
    layer = int(layer) if isinstance(layer, (int, np.integer)) else tuple(int(i) for i in layer)
    for i in (layer,) if isinstance(layer, int) else layer:
        require(-(vision.num_layers + 1) <= i <= vision.num_layers, "vision_feature_layer",
                f"{i} is out of range for a vision tower with {vision.num_layers} layers")
    require(hf.vision_feature_select_strategy in ("default", "full"), "vision_feature_select_strategy",
            f"{hf.vision_feature_select_strategy!r} is not 'default' or 'full'")
    return LlavaConfig(
        vision=vision, text=text, image_token_id=int(hf.image_token_id),
        projector_hidden_act=hf.projector_hidden_act,
        projector_bias=bool(getattr(hf, "multimodal_projector_bias", True)),
        vision_feature_layer=layer, vision_feature_select_strategy=hf.vision_feature_select_strategy,
        tie_word_embeddings=bool(hf.tie_word_embeddings))
