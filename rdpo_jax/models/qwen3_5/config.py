"""Qwen3.5's architecture config, read from a transformers `Qwen3_5Config` (or `Qwen3_5MoeConfig`): Qwen3-VL's
vision tower without DeepStack, and a hybrid decoder (`HybridTextConfig`)."""

from __future__ import annotations

import dataclasses

from rdpo_jax.models import config as config_lib
from rdpo_jax.models.config import DeltaNetConfig, TextConfig, require
from rdpo_jax.models.qwen3_vl import config as qwen3_vl

LINEAR, FULL = "linear_attention", "full_attention"


@dataclasses.dataclass(frozen=True, kw_only=True)
class HybridTextConfig(TextConfig):
    """A decoder whose layers are Gated DeltaNet (`LINEAR`) or gated full attention (`FULL`)."""
    layer_types: tuple[str, ...]
    deltanet: DeltaNetConfig
    rotary_dim: int  # the leading channels of each attention head that rotate (partial_rotary_factor · head_dim)


@dataclasses.dataclass(frozen=True)
class Qwen35Config(qwen3_vl.Qwen3VLConfig):
    """The architecture of a Qwen3.5 model (`model.py`): `text` is a `HybridTextConfig`."""


def text_from_hf(tc) -> HybridTextConfig:
    """A transformers `Qwen3_5TextConfig` / `Qwen3_5MoeTextConfig` (`layer_types` filled in by transformers
    from `full_attention_interval` when the file has none)."""
    types = tuple(tc.layer_types)
    require(len(types) == tc.num_hidden_layers and set(types) <= {LINEAR, FULL}, "text_config.layer_types",
            f"{sorted(set(types))} for {tc.num_hidden_layers} layers; expected one of {[LINEAR, FULL]} per layer")
    rope = dict(tc.rope_parameters or {})
    rotary = int(tc.head_dim * rope.get("partial_rotary_factor", 1.0))
    require(rotary % 2 == 0 and 0 < rotary <= tc.head_dim, "text_config.rope_parameters.partial_rotary_factor",
            f"{rope.get('partial_rotary_factor')} of head_dim {tc.head_dim} is not an even number of channels")
    kh, vh = tc.linear_num_key_heads, tc.linear_num_value_heads
    require(vh % kh == 0, "text_config.linear_num_value_heads", f"{vh} is not a multiple of linear_num_key_heads={kh}")
    require(tc.num_attention_heads % tc.num_key_value_heads == 0, "text_config.num_key_value_heads",
            f"{tc.num_key_value_heads} does not divide num_attention_heads={tc.num_attention_heads}")
    bias = bool(getattr(tc, "attention_bias", False))
    return HybridTextConfig(
        family="qwen3_5", vocab_size=tc.vocab_size, hidden_size=tc.hidden_size,
        intermediate_size=getattr(tc, "intermediate_size", 0) or 0, num_layers=tc.num_hidden_layers,
        num_heads=tc.num_attention_heads, num_kv_heads=tc.num_key_value_heads, head_dim=tc.head_dim,
        rms_norm_eps=tc.rms_norm_eps, hidden_act=tc.hidden_act, qkv_bias=bias, o_bias=bias, mlp_bias=False,
        qk_norm=True, rope=config_lib.rope_from_hf(tc, partial=True),
        mrope_section=config_lib.mrope_section_from_hf(tc, rotary, "interleaved"), mrope_interleaved=True,
        moe=config_lib.moe_from_hf(tc), layer_types=types, rotary_dim=rotary,
        deltanet=DeltaNetConfig(key_heads=kh, value_heads=vh, key_dim=tc.linear_key_head_dim,
                                value_dim=tc.linear_value_head_dim, conv_kernel=tc.linear_conv_kernel_dim))


def from_hf(hf) -> Qwen35Config:
    vision, text = qwen3_vl.vision_from_hf(hf.vision_config), text_from_hf(hf.text_config)
    require(vision.out_hidden_size == text.hidden_size, "vision_config.out_hidden_size",
            f"{vision.out_hidden_size} must equal the text hidden_size {text.hidden_size}")
    require(not vision.deepstack_visual_indexes, "vision_config.deepstack_visual_indexes",
            "Qwen3.5 has no DeepStack")
    return Qwen35Config(vision=vision, text=text, image_token_id=int(hf.image_token_id),
                        video_token_id=int(hf.video_token_id), vision_start_token_id=int(hf.vision_start_token_id),
                        vision_end_token_id=int(hf.vision_end_token_id),
                        tie_word_embeddings=bool(hf.tie_word_embeddings))
