"""Tiny Qwen2.5-VL models (random weights, no downloads): what the tests, the smoke setup
(`data_prep/smoke.py`) and the demo world build. What every family's `tiny` provides is listed in
`models/families.py`."""

from __future__ import annotations

# special tokens beyond the shared "<image>": an image renders as start, pad × n, end
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
IMAGE_MARKUP = "<|vision_start|><|image_pad|><|vision_end|>"  # what the chat template writes for one image


def hf_config(tokenizer, *, width: int = 64, depth: int = 2, image_size: int | None = None, patch_size: int = 4,
              tied: bool = False, **text):
    """A Qwen2.5-VL over `tokenizer`'s vocabulary: decoder `width` wide (4 heads; M-RoPE sections scaled
    to the head; a `hidden_size` in `text` is the width) and `depth` deep; the tower half as wide, two blocks (the second full attention), windows
    of 2×2 merged tokens. `text`: decoder fields to override. (`image_size` is the processor's.)"""
    import transformers

    del image_size
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    width = text.pop("hidden_size", width)  # the tower's output must be the decoder's width
    half = width // 4 // 2  # half the head_dim
    return transformers.Qwen2_5_VLConfig(
        vision_config=dict(depth=2, hidden_size=width // 2, intermediate_size=width, num_heads=4, patch_size=patch_size,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=4 * patch_size,
                           fullatt_block_indexes=[1], out_hidden_size=width),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=depth, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=None, eos_token_id=None,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6,
                                              mrope_section=[half // 4, 3 * half // 8, 3 * half // 8])) | text,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tied)


def save_processor(folder: str, tokenizer, *, image_size: int | None = None, patch_size: int = 4,
                   processor_class: str = "Qwen2_5_VLProcessor") -> None:
    """The processor files in `folder`: patches of `patch_size` merged 2×2, every image resized to about
    `image_size`² pixels, or (None) kept within 8²…48² pixels."""
    from rdpo_jax.models.qwen2_5_vl import images

    pixels = image_size * image_size if image_size else (8 * 8, 48 * 48)
    images.save_processor(folder, tokenizer, patch_size=patch_size, pixels=pixels, processor_class=processor_class)


def smoke_images(rng, png) -> list[bytes]:
    """A smoke record's images: 0, 1 or 2 with sides of 8…48 pixels (`png(rng, size)` draws one)."""
    return [png(rng, tuple(rng.integers(8, 49, 2))) for _ in range(int(rng.choice([0, 1, 1, 2])))]


def smoke_config(c) -> None:
    """`configs/smoke.py`'s settings for this family's records (0–2 images of up to 12×12 patches): the
    tower but its mergers frozen, the mergers at twice the learning rate."""
    c.data.seq_buckets = (64, 128)
    c.data.max_images = 2
    c.data.patch_buckets = (64, 288)  # two images of at most 12×12 patches
    c.optim.freeze = "visual/(patch_embed|pos_embed|blocks)/.*"
    c.optim.lr_multipliers = "visual/(merger|deepstack_merger_list)/.*=2"


def demo_config(c) -> None:
    """`configs/demo.py`'s settings for this family: rows longer by the vision start/end tokens around each
    example's 4 image tokens; patch buffers for a 48×48 image (4×4 patches of 12 px), up to 4 in an SFT row."""
    c.data.seq_buckets = tuple(b + 2 * c.data.groups_per_row for b in c.data.seq_buckets)
    c.data.patch_buckets = (64,) if c.objective == "sft" else (16,)


# The parity config (transformers `Qwen2_5_VLConfig` fields; ../shared/QWEN_VL.md §5) over a 160-token
# vocabulary: both attention kinds run (full-attention blocks 1 and 3 of 4), windows of 2×2 merged tokens,
# M-RoPE sections [2, 3, 3].
PARITY_TOKENS = dict(image_token_id=150, video_token_id=151, vision_start_token_id=152, vision_end_token_id=153)
PARITY_VISION = dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=4, patch_size=4, spatial_merge_size=2,
                     temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1, 3], out_hidden_size=64,
                     tokens_per_second=2)
PARITY_TEXT = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=512, bos_token_id=None, eos_token_id=None,
                   rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 3, 3]))
