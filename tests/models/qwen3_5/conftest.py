import pytest

from tests import tiny_qwen


@pytest.fixture(scope="session")
def tiny_qwen35(tmp_path_factory):
    """`tiny_qwen35(tied) -> (folder, torch_model)`: a tiny random transformers Qwen3.5 (layers [DeltaNet,
    attention] × 2) saved once per session."""
    cache = {}

    def get(tied: bool):
        if tied not in cache:
            folder = str(tmp_path_factory.mktemp("qwen35_tied" if tied else "qwen35"))
            cache[tied] = tiny_qwen.build(tied, folder, family="qwen3_5")
        return cache[tied]

    return get


@pytest.fixture(scope="session")
def qwen35_smoke_dir(tmp_path_factory):
    """`python -m data_prep.smoke --family=qwen3_5` output, built once per session."""
    from data_prep import smoke

    out = str(tmp_path_factory.mktemp("qwen35_smoke"))
    smoke.write_setup(out, pairs=8, sft=16, seed=0, family="qwen3_5")
    return out
