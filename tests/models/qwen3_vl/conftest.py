import pytest

from tests import tiny_qwen


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory):
    """`tiny_qwen3(tied) -> (folder, torch_model)`: a tiny random transformers Qwen3-VL saved once per session."""
    cache = {}

    def get(tied: bool):
        if tied not in cache:
            folder = str(tmp_path_factory.mktemp("qwen3_tied" if tied else "qwen3"))
            cache[tied] = tiny_qwen.build(tied, folder, family="qwen3_vl")
        return cache[tied]

    return get


@pytest.fixture(scope="session")
def qwen3_smoke_dir(tmp_path_factory):
    """`python -m data_prep.smoke --family=qwen3_vl` output (8 pairs with 0–2 images of different sizes, 16
    SFT examples), built once per session."""
    from data_prep import smoke

    out = str(tmp_path_factory.mktemp("qwen3_smoke"))
    smoke.write_setup(out, pairs=8, sft=16, seed=0, family="qwen3_vl")
    return out
