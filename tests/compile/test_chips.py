"""Slice names as users type them → the chip grids libtpu compiles for."""

import pytest

from rdpo_jax.compile import chips


@pytest.mark.parametrize("name, grid, chip_count", [
    ("v5p-8", "v5p:2x2x1", 4), ("v5p-64", "v5p:4x4x2", 32), ("v5p-128", "v5p:4x4x4", 64),
    ("v4-32", "v4:4x2x2", 16), ("v5litepod-256", "v5e:16x16", 256), ("v5e-8", "v5e:4x2", 8),
    ("v6e-64", "v6e:8x8", 64), ("V6E-4", "v6e:2x2", 4), ("v5p:2x4x4", "v5p:2x4x4", 32),
])
def test_slice_names(name, grid, chip_count):
    got, chip = chips.topology(name)
    assert got == grid and chips.chips_in(got) == chip_count
    assert chip is chips.CHIPS[grid.split(":")[0]]


@pytest.mark.parametrize("name, message", [
    ("v5p-6", "power of two"), ("v5p-7", "power of two"), ("v7-8", "generations"), ("v5e:2x2x2", "2 dimensions"),
    ("tpu", "expected a TPU type"),
])
def test_bad_names_say_what_is_expected(name, message):
    with pytest.raises(ValueError, match=message):
        chips.topology(name)


def test_the_grids_are_topologies_libtpu_knows(tpu_env):
    for name in ("v5p-64", "v5litepod-256", "v6e-64"):
        grid, _, devices = chips.devices(name)
        assert len(devices) == chips.chips_in(grid)
