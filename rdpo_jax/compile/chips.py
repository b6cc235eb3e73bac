"""TPU generations in one table, and topology names as users type them.

`topology("v5p-64")` → "v5p:4x4x2": the name of a slice as Cloud TPU sells it (v4 and v5p count
TensorCores, two per chip; v5e — also `v5litepod-N` — and v6e count chips) turned into the chip grid that
`jax.experimental.topologies.get_topology_desc` takes; the grid form passes through. The figures are the
public per-chip specifications: HBM, dense bfloat16 peak and HBM bandwidth.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str  # the generation as get_topology_desc names it
    hbm_gib: float  # HBM per chip
    bf16_tflops: float  # dense bfloat16 peak per chip
    hbm_gbps: float  # HBM bandwidth per chip, GB/s
    cores_per_chip: int  # TensorCores a slice name counts per chip (v4-8, v5p-8: 4 chips)
    grid_dims: int  # 3: a 3D torus of chips (v4, v5p); 2: a 2D grid (v5e, v6e)


CHIPS = {c.name: c for c in (
    Chip("v4", hbm_gib=32, bf16_tflops=275, hbm_gbps=1228, cores_per_chip=2, grid_dims=3),
    Chip("v5e", hbm_gib=16, bf16_tflops=197, hbm_gbps=819, cores_per_chip=1, grid_dims=2),
    Chip("v5p", hbm_gib=95, bf16_tflops=459, hbm_gbps=2765, cores_per_chip=2, grid_dims=3),
    Chip("v6e", hbm_gib=32, bf16_tflops=918, hbm_gbps=1640, cores_per_chip=1, grid_dims=2),
)}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e", "v6lite": "v6e"}


def _grid(chips: int, dims: int) -> tuple[int, ...]:
    """The usual chip grid of a slice of `chips` chips: factors of two dealt out in turn, largest first
    (4 → 2x2x1, 32 → 4x4x2; 2D: 8 → 4x2, 256 → 16x16)."""
    grid = [1] * dims
    for i in range(chips.bit_length() - 1):
        grid[i % dims] *= 2
    return tuple(sorted(grid, reverse=True))


def topology(name: str) -> tuple[str, Chip]:
    """(get_topology_desc's topology name, the chip) of `name`: a slice as sold ("v5p-64",
    "v5litepod-256", "v6e-64", "v4-32") or a chip grid ("v5p:4x4x2", "v5e:4x8")."""
    text = name.strip().lower()
    m = re.fullmatch(r"([a-z0-9]+?)(?:-(\d+)|:(\d+(?:x\d+)+))", text)
    generation = m and ALIASES.get(m.group(1), m.group(1))
    if not m or generation not in CHIPS:
        raise ValueError(f"topology {name!r}: expected a TPU type such as v5p-64, v5litepod-256, v6e-64, v4-32, "
                         f"or a chip grid such as v5p:4x4x2; generations: {sorted(CHIPS)} (v5litepod = v5e)")
    chip = CHIPS[generation]
    if m.group(3):
        grid = tuple(int(x) for x in m.group(3).split("x"))
        if len(grid) != chip.grid_dims:
            raise ValueError(f"topology {name!r}: a {chip.name} grid has {chip.grid_dims} dimensions")
        return f"{chip.name}:{'x'.join(map(str, grid))}", chip
    count = int(m.group(2))
    chips, rest = divmod(count, chip.cores_per_chip)
    if rest or chips < 1 or chips & (chips - 1):
        per = f"{chip.cores_per_chip} TensorCores per chip, " if chip.cores_per_chip > 1 else ""
        raise ValueError(f"topology {name!r}: {chip.name}-N counts {per}a power of two of chips; got {count}")
    return f"{chip.name}:{'x'.join(map(str, _grid(chips, chip.grid_dims)))}", chip


def chips_in(topology_name: str) -> int:
    return math.prod(int(x) for x in topology_name.split(":")[1].split("x"))


def devices(name: str, num_slices: int = 1) -> tuple[str, Chip, list]:
    """(topology name, chip, the devices of `num_slices` slices of `name`) for compiling on this host: libtpu
    is started with `libtpu_env` (unless the environment already says otherwise)."""
    topology_name, chip = topology(name)
    for key, value in libtpu_env(topology_name).items():
        os.environ.setdefault(key, value)
    from jax.experimental import topologies

    desc = topologies.get_topology_desc(topology_name=topology_name, platform="tpu", num_slices=num_slices)
    return topology_name, chip, list(desc.devices)


def libtpu_env(topology_name: str) -> dict[str, str]:
    """The environment libtpu needs to start on a host that is not a TPU VM, quietly: what it would ask
    the VM's metadata server, and leave to share the host with other processes compiling for TPU (it
    takes a lock file otherwise)."""
    generation = topology_name.split(":")[0]
    chip = CHIPS[generation]
    kind = {"v5e": "v5litepod"}.get(generation, generation)
    return {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
            "TPU_ACCELERATOR_TYPE": f"{kind}-{chips_in(topology_name) * chip.cores_per_chip}"}
