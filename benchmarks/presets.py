"""The architectures of the models the benchmarks and the shipped TPU configs are sized for, as transformers
configs: the architecture fields of llava-hf/llava-1.5-7b-hf's, Qwen/Qwen2.5-VL-7B-Instruct's,
Qwen/Qwen3-VL-8B-Instruct's, Qwen/Qwen3-VL-30B-A3B-Instruct's and Qwen/Qwen3.5-27B's config.json (no weights are
read). A preset is one entry of `PRESETS`."""

from functools import partial

import transformers

# Qwen3-VL's vision tower, the same in the 8B and the 30B-A3B but for the width it projects to
_QWEN3_TOWER = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                    spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                    deepstack_visual_indexes=[8, 16, 24], hidden_act="gelu_pytorch_tanh")

PRESETS = {
    "llava-1.5-7b": partial(
        transformers.LlavaConfig,
        vision_config=dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                           num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14,
                           projection_dim=768, hidden_act="quick_gelu"),
        text_config=dict(model_type="llama", vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                         max_position_embeddings=4096, rms_norm_eps=1e-5),
        image_token_index=32000, vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", architectures=["LlavaForConditionalGeneration"]),
    "qwen2.5-vl-7b": partial(
        transformers.Qwen2_5_VLConfig,
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           fullatt_block_indexes=[7, 15, 23, 31], patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=112),
        text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[16, 24, 24])),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=False, architectures=["Qwen2_5_VLForConditionalGeneration"]),
    "qwen3-vl-8b": partial(
        transformers.Qwen3VLConfig,
        vision_config=_QWEN3_TOWER | dict(out_hidden_size=4096),
        text_config=dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
                         max_position_embeddings=262144,
                         rope_parameters=dict(rope_type="default", rope_theta=5e6, mrope_section=[24, 20, 20],
                                              mrope_interleaved=True)),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=False, architectures=["Qwen3VLForConditionalGeneration"]),
    "qwen3-vl-30b-a3b": partial(  # Qwen3-VL-8B's tower into a 48-layer decoder of 128 experts, 8 per token
        transformers.Qwen3VLMoeConfig,
        vision_config=_QWEN3_TOWER | dict(out_hidden_size=2048),
        text_config=dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                         num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[],
                         router_aux_loss_coef=0.001, num_hidden_layers=48, num_attention_heads=32,
                         num_key_value_heads=4, head_dim=128, rms_norm_eps=1e-6, max_position_embeddings=262144,
                         rope_parameters=dict(rope_type="default", rope_theta=5e6, mrope_section=[24, 20, 20],
                                              mrope_interleaved=True)),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=False, architectures=["Qwen3VLMoeForConditionalGeneration"]),
    "qwen3.5-27b": partial(  # Qwen3-VL's tower without DeepStack into 16 blocks of 3 Gated DeltaNet + 1 gated attention
        transformers.Qwen3_5Config,
        vision_config=_QWEN3_TOWER | dict(out_hidden_size=5120, deepstack_visual_indexes=[]),
        text_config=dict(vocab_size=248320, hidden_size=5120, intermediate_size=17408, num_hidden_layers=64,
                         layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 16,
                         num_attention_heads=24, num_key_value_heads=4, head_dim=256, linear_num_key_heads=16,
                         linear_num_value_heads=48, linear_key_head_dim=128, linear_value_head_dim=128,
                         linear_conv_kernel_dim=4, rms_norm_eps=1e-6, max_position_embeddings=262144,
                         rope_parameters=dict(rope_type="default", rope_theta=1e7, partial_rotary_factor=0.25,
                                              mrope_section=[11, 11, 10], mrope_interleaved=True)),
        image_token_id=248056, video_token_id=248057, vision_start_token_id=248053, vision_end_token_id=248054,
        tie_word_embeddings=False, architectures=["Qwen3_5ForConditionalGeneration"]),
}
NAMES = tuple(PRESETS)


def hf_config(name: str) -> transformers.PretrainedConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {NAMES}")
    return PRESETS[name]()
