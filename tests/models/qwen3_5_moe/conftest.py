import pytest

from tests import tiny_qwen


@pytest.fixture(scope="session")
def tiny_qwen35_moe(tmp_path_factory):
    """(folder, torch model): a tiny random transformers Qwen3.5-MoE (untied; its experts saved per expert, as
    transformers 5.23's `save_pretrained` writes them), built once per session."""
    return tiny_qwen.build(False, str(tmp_path_factory.mktemp("qwen35_moe")), family="qwen3_5_moe")


@pytest.fixture(scope="session")
def qwen35_moe_smoke_dir(tmp_path_factory):
    """`python -m data_prep.smoke --family=qwen3_5_moe` output, built once per session."""
    from data_prep import smoke

    out = str(tmp_path_factory.mktemp("qwen35_moe_smoke"))
    smoke.write_setup(out, pairs=8, sft=16, seed=0, family="qwen3_5_moe")
    return out
