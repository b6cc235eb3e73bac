"""Qwen2.5-VL's architecture config, read from a transformers `Qwen2_5_VLConfig`."""

from __future__ import annotations

import dataclasses

from rdpo_jax.models.config import TextConfig, require, text_from_hf


@dataclasses.dataclass(frozen=True)
class QwenVisionConfig:
    """The Qwen2.5-VL vision tower (`vision.py`)."""
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int  # spatial_merge_size
    window_size: int  # in pixels
    fullatt_block_indexes: tuple[int, ...]
    out_hidden_size: int
    in_channels: int = 3
    hidden_act: str = "silu"
    rope_theta: float = 10000.0

    @classmethod
    def from_hf(cls, vc) -> QwenVisionConfig:
        """A `transformers.Qwen2_5_VLVisionConfig`."""
        rope = dict(getattr(vc, "rope_parameters", None) or {})
        return cls(depth=vc.depth, hidden_size=vc.hidden_size, intermediate_size=vc.intermediate_size,
                   num_heads=vc.num_heads, patch_size=vc.patch_size, temporal_patch_size=vc.temporal_patch_size,
                   merge_size=vc.spatial_merge_size, window_size=vc.window_size,
                   fullatt_block_indexes=tuple(vc.fullatt_block_indexes), out_hidden_size=vc.out_hidden_size,
                   in_channels=vc.in_channels, hidden_act=vc.hidden_act, rope_theta=rope.get("rope_theta", 10000.0))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def window_tokens(self) -> int:
        """A window's side in merged tokens (transformers: window_size // merge // patch)."""
        return self.window_size // self.merge_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class QwenVLConfig:
    """The architecture of a Qwen2.5-VL model (`model.py`)."""
    vision: QwenVisionConfig
    text: TextConfig
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    tie_word_embeddings: bool


def from_hf(hf) -> QwenVLConfig:
    vc = hf.vision_config
    rope = dict(getattr(vc, "rope_parameters", None) or {})
    require(rope.get("rope_type", "axial") == "axial", "vision_config.rope_parameters.rope_type",
            f"{rope.get('rope_type')!r} is not supported; supported: ['axial']")
    require(vc.hidden_size % vc.num_heads == 0 and (vc.hidden_size // vc.num_heads) % 4 == 0,
            "vision_config.num_heads", f"hidden_size {vc.hidden_size} / num_heads {vc.num_heads} must be a "
            "head_dim divisible by 4 (2D rotary embedding)")
    for i in vc.fullatt_block_indexes:
        require(0 <= i < vc.depth, "vision_config.fullatt_block_indexes", f"{i} is outside the depth {vc.depth}")
    require(vc.hidden_act in ("silu", "gelu", "gelu_pytorch_tanh", "quick_gelu", "relu"), "vision_config.hidden_act",
            f"{vc.hidden_act!r} is not supported")
    # the text config inside is "qwen2_5_vl_text": a Qwen2 decoder with M-RoPE
    vision, text = QwenVisionConfig.from_hf(vc), text_from_hf(hf.text_config, family="qwen2", mrope="contiguous")
    require(vision.out_hidden_size == text.hidden_size, "vision_config.out_hidden_size",
            f"{vision.out_hidden_size} must equal the text hidden_size {text.hidden_size}")
    return QwenVLConfig(vision=vision, text=text, image_token_id=int(hf.image_token_id),
                        video_token_id=int(hf.video_token_id), vision_start_token_id=int(hf.vision_start_token_id),
                        vision_end_token_id=int(hf.vision_end_token_id),
                        tie_word_embeddings=bool(hf.tie_word_embeddings))
