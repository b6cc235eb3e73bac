import pytest

from tests import tiny_qwen


@pytest.fixture(scope="session")
def tiny_qwen3_moe(tmp_path_factory):
    """`tiny_qwen3_moe(kind) -> (folder, torch_model)`, a tiny random transformers Qwen3-VL-MoE saved once per
    session: "mixed" (untied, layer 0 dense, 1 and 2 sparse) or "sparse" (tied, every layer sparse)."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            folder = str(tmp_path_factory.mktemp(f"qwen3_moe_{kind}"))
            text = {} if kind == "mixed" else dict(mlp_only_layers=[])
            cache[kind] = tiny_qwen.build(kind == "sparse", folder, family="qwen3_vl_moe", **text)
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def qwen3_moe_smoke_dir(tmp_path_factory):
    """`python -m data_prep.smoke --family=qwen3_vl_moe` output, built once per session."""
    from data_prep import smoke

    out = str(tmp_path_factory.mktemp("qwen3_moe_smoke"))
    smoke.write_setup(out, pairs=8, sft=16, seed=0, family="qwen3_vl_moe")
    return out
