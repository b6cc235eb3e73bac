"""Tiny Qwen3-VL models (random weights, no downloads): what the tests, the smoke setup
(`data_prep/smoke.py`) and the demo world build. What every family's `tiny` provides is listed in
`models/vlm.py` (`Family`). Images, the processor and the chat markup are Qwen2.5-VL's."""

from __future__ import annotations

import functools

from rdpo_jax.models.qwen2_5_vl import tiny as qwen2_5_vl
from rdpo_jax.models.qwen2_5_vl.tiny import IMAGE_MARKUP, VISION_TOKENS, demo_config, smoke_config, smoke_images

__all__ = ["IMAGE_MARKUP", "VISION_TOKENS", "demo_config", "hf_config", "save_processor", "smoke_config",
           "smoke_images"]
save_processor = functools.partial(qwen2_5_vl.save_processor, processor_class="Qwen3VLProcessor")


def hf_config(tokenizer, *, width: int = 64, depth: int = 2, image_size: int | None = None, patch_size: int = 4,
              tied: bool = False, **text):
    """A Qwen3-VL over `tokenizer`'s vocabulary: decoder `width` wide (4 heads of width/4; interleaved
    M-RoPE sections scaled to the head; a `hidden_size` in `text` is the width) and `depth` deep; the tower
    half as wide, two blocks, a 4×4 position table, DeepStack from block 0 into decoder layer 0. `text`:
    decoder fields to override. (`image_size` is the processor's.)"""
    import transformers

    del image_size
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    width = text.pop("hidden_size", width)  # the tower's output must be the decoder's width
    half = width // 4 // 2  # half the head_dim
    h = w = half // 4  # the real models' proportions: [24, 20, 20] of 64
    return transformers.Qwen3VLConfig(
        vision_config=dict(depth=2, hidden_size=width // 2, intermediate_size=width, num_heads=4, patch_size=patch_size,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=width,
                           num_position_embeddings=16, deepstack_visual_indexes=[0]),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=depth, num_attention_heads=4, num_key_value_heads=2, head_dim=width // 4,
                         max_position_embeddings=512, bos_token_id=None, eos_token_id=None,
                         rope_parameters=dict(rope_type="default", rope_theta=5e6, mrope_section=[half - h - w, h, w],
                                              mrope_interleaved=True)) | text,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tied)


# The parity config (transformers `Qwen3VLConfig` fields; ../shared/QWEN_VL.md §5) over a 160-token
# vocabulary: DeepStack from blocks 0 and 2 of 4 into decoder layers 0 and 1 of 3, a 4×4 position table
# resampled to every grid, interleaved M-RoPE sections [4, 2, 2].
PARITY_TOKENS = dict(image_token_id=150, video_token_id=151, vision_start_token_id=152, vision_end_token_id=153)
PARITY_VISION = dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=4, patch_size=4, spatial_merge_size=2,
                     temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=16,
                     deepstack_visual_indexes=[0, 2])
PARITY_TEXT = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, max_position_embeddings=512, bos_token_id=None,
                   eos_token_id=None, rope_parameters=dict(rope_type="default", rope_theta=5e6, mrope_section=[4, 2, 2],
                                                           mrope_interleaved=True))
