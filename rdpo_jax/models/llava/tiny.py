"""Tiny LLaVA models (random weights, no downloads): what the tests, the smoke setup
(`data_prep/smoke.py`) and the demo world build. What every family's `tiny` provides is listed in
`models/families.py`."""

from __future__ import annotations

VISION_TOKENS: tuple[str, ...] = ()  # special tokens beyond the shared "<image>"
IMAGE_MARKUP = "<image>"  # what the chat template writes for one image


def hf_config(tokenizer, *, width: int = 64, depth: int = 2, image_size: int = 32, patch_size: int = 8,
              tied: bool = False, **text):
    """A SigLIP + Qwen2 LLaVA over `tokenizer`'s vocabulary: decoder `width` wide and `depth` deep (the
    tower half as wide, two layers); `text`: decoder fields to override."""
    import transformers

    return transformers.LlavaConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=width // 2, intermediate_size=width,
                           num_hidden_layers=2, num_attention_heads=4, image_size=image_size, patch_size=patch_size),
        text_config=dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=depth, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=tied) | text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_MARKUP), vision_feature_layer=-1,
        vision_feature_select_strategy="full")


def save_processor(folder: str, tokenizer, *, image_size: int = 32, patch_size: int = 8) -> None:
    """The LlavaProcessor files (a SigLIP image processor resizing to `image_size`, the tokenizer and its
    chat template) in `folder`."""
    import transformers

    transformers.LlavaProcessor(
        image_processor=transformers.SiglipImageProcessorPil(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer, patch_size=patch_size, vision_feature_select_strategy="full",
        chat_template=tokenizer.chat_template, image_token=IMAGE_MARKUP, num_additional_image_tokens=0,
    ).save_pretrained(folder)


def smoke_images(rng, png) -> list[bytes]:
    """A smoke record's images: one 24×24 (`png(rng, size)` draws one)."""
    return [png(rng, (24, 24))]


# Parity configs (transformers `LlavaConfig` fields) over a 160-token vocabulary, image token 5: every
# tower, decoder, feature-layer and tying option the family reads.
_SIGLIP = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=3,
               num_attention_heads=4, image_size=32, patch_size=8)
_CLIP = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=3,
             num_attention_heads=4, image_size=32, patch_size=8, projection_dim=16, hidden_act="quick_gelu")
_TEXT = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)
PARITY = {
    # SigLIP + Qwen2 (qkv bias), last layer, all patches, untied, GQA 4/2.
    "siglip_qwen2": dict(
        vision_config=_SIGLIP, text_config=dict(_TEXT, model_type="qwen2", rope_theta=1e6),
        vision_feature_layer=-1, vision_feature_select_strategy="full"),
    # CLIP (class token, pre-layernorm, quick_gelu) + Llama with llama3 RoPE scaling, GQA 8/2,
    # vision_feature_layer=-2 and the `default` strategy (class token dropped).
    "clip_llama": dict(
        vision_config=_CLIP,
        text_config=dict(_TEXT, model_type="llama", num_attention_heads=8, num_key_value_heads=2,
                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=64)),
        vision_feature_layer=-2, vision_feature_select_strategy="default"),
    # SigLIP + Qwen3 (q/k norm, head_dim ≠ hidden/heads), tied embeddings, two feature layers concatenated.
    "siglip_qwen3": dict(
        vision_config=_SIGLIP,
        text_config=dict(_TEXT, model_type="qwen3", head_dim=32, tie_word_embeddings=True),
        vision_feature_layer=[-3, -1], vision_feature_select_strategy="full", tie_word_embeddings=True),
    # CLIP + Llama with linear RoPE scaling, attention and MLP biases, tied embeddings; features straight
    # from the embeddings (-4 = index 0 of 3 layers: no encoder layer runs).
    "clip_llama_tied": dict(
        vision_config=_CLIP,
        text_config=dict(_TEXT, model_type="llama", attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
                         rope_scaling=dict(rope_type="linear", factor=2.0)),
        vision_feature_layer=-4, vision_feature_select_strategy="default", tie_word_embeddings=True),
}


def smoke_config(c) -> None:
    """`configs/smoke.py`'s settings for this family (one image per record): the tower frozen, the projector
    at twice the learning rate."""
    c.optim.freeze = "vision_tower/.*"
    c.optim.lr_multipliers = "multi_modal_projector/.*=2"


def demo_config(c) -> None:
    """`configs/demo.py`'s settings for this family: its defaults."""
