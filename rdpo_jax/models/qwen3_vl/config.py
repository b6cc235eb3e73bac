"""Qwen3-VL's architecture config, read from a transformers `Qwen3VLConfig`."""

from __future__ import annotations

import dataclasses
import math

from rdpo_jax.models.config import TextConfig, require, text_from_hf


@dataclasses.dataclass(frozen=True)
class Qwen3VisionConfig:
    """The Qwen3-VL vision tower (`vision.py`)."""
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int  # spatial_merge_size
    out_hidden_size: int
    num_position_embeddings: int  # a square table of learned positions, resampled to each image's grid
    deepstack_visual_indexes: tuple[int, ...]  # blocks whose outputs also feed the decoder (DeepStack)
    in_channels: int = 3
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def position_side(self) -> int:
        return math.isqrt(self.num_position_embeddings)


@dataclasses.dataclass(frozen=True)
class Qwen3VLConfig:
    """The architecture of a Qwen3-VL model (`model.py`)."""
    vision: Qwen3VisionConfig
    text: TextConfig
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    tie_word_embeddings: bool


def vision_from_hf(vc) -> Qwen3VisionConfig:
    """A transformers `Qwen3VLVisionConfig`."""
    rope = dict(getattr(vc, "rope_parameters", None) or {})
    require(rope.get("rope_type", "axial") == "axial", "vision_config.rope_parameters.rope_type",
            f"{rope.get('rope_type')!r} is not supported; supported: ['axial']")
    require(vc.hidden_size % vc.num_heads == 0 and (vc.hidden_size // vc.num_heads) % 4 == 0,
            "vision_config.num_heads", f"hidden_size {vc.hidden_size} / num_heads {vc.num_heads} must be a "
            "head_dim divisible by 4 (2D rotary embedding)")
    require(math.isqrt(vc.num_position_embeddings) ** 2 == vc.num_position_embeddings,
            "vision_config.num_position_embeddings", f"{vc.num_position_embeddings} is not a square")
    levels = list(getattr(vc, "deepstack_visual_indexes", None) or ())  # Qwen3.5's tower has none
    require(levels == sorted(set(levels)) and all(0 <= i < vc.depth for i in levels),
            "vision_config.deepstack_visual_indexes", f"{levels} must be increasing block indexes below the depth "
            f"{vc.depth}")
    require(vc.hidden_act in ("silu", "gelu", "gelu_pytorch_tanh", "quick_gelu", "relu"), "vision_config.hidden_act",
            f"{vc.hidden_act!r} is not supported")
    return Qwen3VisionConfig(
        depth=vc.depth, hidden_size=vc.hidden_size, intermediate_size=vc.intermediate_size, num_heads=vc.num_heads,
        patch_size=vc.patch_size, temporal_patch_size=vc.temporal_patch_size, merge_size=vc.spatial_merge_size,
        out_hidden_size=vc.out_hidden_size, num_position_embeddings=vc.num_position_embeddings,
        deepstack_visual_indexes=tuple(int(i) for i in levels), in_channels=vc.in_channels,
        hidden_act=vc.hidden_act, rope_theta=rope.get("rope_theta", 10000.0))


def from_hf(hf) -> Qwen3VLConfig:
    # the text config inside is "qwen3_vl_text": a Qwen3 decoder with interleaved M-RoPE
    vision, text = vision_from_hf(hf.vision_config), text_from_hf(hf.text_config, family="qwen3", mrope="interleaved")
    require(vision.out_hidden_size == text.hidden_size, "vision_config.out_hidden_size",
            f"{vision.out_hidden_size} must equal the text hidden_size {text.hidden_size}")
    require(len(vision.deepstack_visual_indexes) <= text.num_layers, "vision_config.deepstack_visual_indexes",
            f"{len(vision.deepstack_visual_indexes)} DeepStack levels for {text.num_layers} decoder layers")
    return Qwen3VLConfig(vision=vision, text=text, image_token_id=int(hf.image_token_id),
                         video_token_id=int(hf.video_token_id), vision_start_token_id=int(hf.vision_start_token_id),
                         vision_end_token_id=int(hf.vision_end_token_id),
                         tie_word_embeddings=bool(hf.tie_word_embeddings))
