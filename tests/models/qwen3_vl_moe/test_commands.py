"""Qwen3-VL-MoE on the serving path: the server's engine (chat template, preprocessing, 3D positions,
DeepStack, the sparse layers in prefill and cached decoding) answers as transformers' `generate`."""

from tests.models.qwen3_vl.test_commands import engine_equals_generate


def test_engine_decodes_as_transformers_generate(qwen3_moe_smoke_dir):
    engine_equals_generate(qwen3_moe_smoke_dir)
