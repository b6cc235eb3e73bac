"""Tiny Qwen3.5 models (random weights, no downloads): what the tests, the smoke setup and the demo world
build. What every family's `tiny` provides is listed in `models/vlm.py` (`Family`). Images, the processor
and the chat markup are Qwen3-VL's."""

from __future__ import annotations

from rdpo_jax.models.qwen3_vl.tiny import (IMAGE_MARKUP, PARITY_TOKENS, VISION_TOKENS, demo_config, save_processor,
                                           smoke_config, smoke_images)

__all__ = ["IMAGE_MARKUP", "VISION_TOKENS", "demo_config", "hf_config", "save_processor", "smoke_config",
           "smoke_images", "PARITY_TOKENS", "PARITY_VISION", "PARITY_TEXT"]


def layer_types(depth: int, interval: int = 2) -> list[str]:
    """Layer i is full attention iff (i + 1) % interval == 0 (transformers' `full_attention_interval`)."""
    return ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(depth)]


def hf_config(tokenizer, *, width: int = 64, depth: int = 2, image_size: int | None = None, patch_size: int = 4,
              tied: bool = False, **text):
    """A Qwen3.5 over `tokenizer`'s vocabulary: decoder `width` wide and `depth` deep, DeltaNet and attention
    layers alternating; attention 4 heads of width/2 (a quarter of each rotating), DeltaNet 2 key heads and
    4 value heads of width/8; the tower half as wide, two blocks, no DeepStack. `text`: decoder fields to
    override (a `hidden_size` there is the width)."""
    import transformers

    del image_size
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    width = text.pop("hidden_size", width)
    half = width // 16  # rotary channels / 2
    h = w = max(half // 4, 1)
    fields = dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=depth,
                  layer_types=layer_types(depth), num_attention_heads=4, num_key_value_heads=2, head_dim=width // 2,
                  linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=width // 8,
                  linear_value_head_dim=width // 8, linear_conv_kernel_dim=4, max_position_embeddings=512,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None,
                  rope_parameters=dict(rope_type="default", rope_theta=1e7, partial_rotary_factor=0.25,
                                       mrope_section=[half - h - w, h, w], mrope_interleaved=True))
    return transformers.Qwen3_5Config(
        vision_config=dict(depth=2, hidden_size=width // 2, intermediate_size=width, num_heads=4, patch_size=patch_size,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=width,
                           num_position_embeddings=16),
        text_config=fields | text, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tied)


# The parity config (../shared/QWEN35.md §7) over a 160-token vocabulary: layers [DeltaNet, attention] × 2,
# 2 key heads for 4 value heads (GVA), a quarter of each 32-wide attention head rotating, sections [2, 1, 1].
PARITY_VISION = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=4, patch_size=4, spatial_merge_size=2,
                     temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=16)
PARITY_TEXT = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                   layer_types=layer_types(4), num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                   linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
                   linear_conv_kernel_dim=4, max_position_embeddings=512, bos_token_id=None, eos_token_id=None,
                   pad_token_id=None, rope_parameters=dict(rope_type="default", rope_theta=1e7,
                                                           partial_rotary_factor=0.25, mrope_section=[2, 1, 1],
                                                           mrope_interleaved=True))
