import pytest

from rdpo_jax.compile import chips


@pytest.fixture
def tpu_env(monkeypatch):
    """libtpu present and told it runs on a CPU host (it reads this once, when it first starts)."""
    pytest.importorskip("libtpu")
    for name, value in chips.libtpu_env("v5p:2x2x1").items():
        monkeypatch.setenv(name, value)
