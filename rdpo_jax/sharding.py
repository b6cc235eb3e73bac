"""Device mesh and the one table that maps logical axis names to mesh axes.

Every parameter carries `logical_axes` metadata (e.g. `("embed", "mlp")`); activations are constrained
with logical names too. `RULES` turns a logical name into mesh axes of the mesh
`("data", "fsdp", "expert", "tensor")`:

  data    pure data parallelism (parameters replicated along it),
  fsdp    data parallelism with parameters and optimizer state sharded along it (ZeRO-3 style),
  expert  data parallelism whose devices split a MoE's experts between them (`models/moe.py` moves each
          token to its experts' devices and back by all-to-all); other parameters replicated along it,
  tensor  Megatron-style tensor parallelism over heads, MLP width and vocabulary.

A dimension whose size is not divisible by its mesh axes falls back to replication on those axes (a
vision tower's 1152-wide MLP on a 16-way tensor axis, say); a mesh axis is used at most once per array.
`overview` tabulates the result for a model and names every dimension left whole.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")  # the mesh axes batch rows are split over

# Logical name -> mesh axis, tuple of mesh axes, or None (replicated).
RULES: dict[str, str | tuple[str, ...] | None] = {
    # activations
    "batch": BATCH_AXES,
    "seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "expert": "expert",  # a MoE's stacked experts (`models/moe.py`) split over the expert axis, …
    "expert_embed": "fsdp",  # … their model width over fsdp, …
    "expert_mlp": None,  # … their hidden width whole (each expert's SwiGLU runs on one device)
    "norm": None,
    "patch": None,
    "position": None,
    "layers": None,  # the stacked axis of scanned layers (`models.layers.stack`): each device holds every layer
}


def mesh_sizes(shape: Mapping[str, int] | Sequence[int], num_devices: int) -> dict[str, int]:
    """Axis sizes of the `MESH_AXES` mesh for `num_devices` devices.

    `shape` maps axes to sizes (`{"data": -1, "fsdp": 4, "tensor": 2}`; axes left out have size 1) or lists
    the four sizes; one
    size may be -1: it takes all the devices left over. Raises ValueError if the mesh does not use
    exactly `num_devices` devices.
    """
    if isinstance(shape, Mapping):
        unknown = set(shape) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"mesh: unknown axis {sorted(unknown)}; axes are {MESH_AXES}")
        sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    else:
        sizes = [int(s) for s in shape]
        if len(sizes) != len(MESH_AXES):
            raise ValueError(f"mesh: expected {len(MESH_AXES)} sizes for {MESH_AXES}, got {sizes}")
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh: sizes must be positive with at most one -1, got {dict(zip(MESH_AXES, sizes))}")
    if -1 in sizes:
        rest = math.prod(s for s in sizes if s != -1)
        if num_devices % rest:
            raise ValueError(f"mesh: {num_devices} devices are not divisible by the fixed axes "
                             f"{dict(zip(MESH_AXES, sizes))} (product {rest})")
        sizes[sizes.index(-1)] = num_devices // rest
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh: {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, but "
                         f"{num_devices} are available")
    return dict(zip(MESH_AXES, sizes))


def init_distributed(d) -> None:
    """Joins the run's JAX processes as the config's `distributed` settings say (a no-op for one process):
    an explicit coordinator (CPU processes on one machine: gloo collectives), or auto-detection (TPU pods,
    SLURM, GPU clusters). Every command that runs on all processes of a slice calls it first."""
    if d.coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU multi-process collectives
        jax.distributed.initialize(coordinator_address=d.coordinator, num_processes=d.num_processes,
                                   process_id=d.process_id)
    elif d.auto:
        jax.distributed.initialize()


def make_mesh(shape: Mapping[str, int] | Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the `MESH_AXES` mesh (Auto axes) over `devices` (default: all); see
    `mesh_sizes` for `shape`. Devices of several slices (Multislice) split "data" between slices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_sizes(shape, len(devices))
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices > 1:  # Multislice: "data" spans the slices (over the data-center network), the rest stay inside one
        if sizes["data"] % slices:
            raise ValueError(f"mesh: {slices} slices need a data axis that is a multiple of {slices}, got "
                             f"{sizes['data']}")
        inner = (sizes["data"] // slices, sizes["fsdp"], sizes["expert"], sizes["tensor"])
        grid = mesh_utils.create_hybrid_device_mesh(inner, (slices, 1, 1, 1), devices=devices)
        return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    return jax.make_mesh(tuple(sizes.values()), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def logical_to_spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int],
    mesh_shape: Mapping[str, int],
    rules: Mapping[str, str | tuple[str, ...] | None] = RULES,
    units: Sequence[int] | None = None,
) -> PartitionSpec:
    """Maps logical axis names of an array of `shape` to a PartitionSpec for a mesh of `mesh_shape`.

    Mesh axes that are missing from the mesh, already used by an earlier dimension, or that do not divide
    the dimension are dropped (that dimension is then replicated over them). `units` gives, per dimension,
    the size of its indivisible pieces (head_dim for heads × head_dim): a mesh axis must divide the
    number of pieces, so that no device holds part of a head.
    """
    return _plan(logical_axes, shape, mesh_shape, rules, units)[0]


def _plan(logical_axes, shape, mesh_shape, rules, units) -> tuple[PartitionSpec, dict[int, str]]:
    """The decision behind `logical_to_spec` and `overview`: (spec, left_out). `left_out` maps each
    dimension whose rule names a mesh axis of size > 1 that the spec does not split it over to why:
    "kv_heads → tensor=4, size 16 = 2 units of 8: not split over tensor (2 units not divisible by 4)"."""
    if len(logical_axes) != len(shape) or (units is not None and len(units) != len(shape)):
        raise ValueError(f"logical axes {tuple(logical_axes)} (units {units}) do not match shape {tuple(shape)}")
    units = units or (1,) * len(shape)
    used: dict[str, int] = {}  # mesh axis -> the dimension it shards
    spec, left_out = [], {}
    for dim, (name, size, unit) in enumerate(zip(logical_axes, shape, units)):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no entry in the sharding rules {sorted(rules)}")
        target = rules[name]
        axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        axes = tuple(a for a in axes if mesh_shape.get(a, 1) > 1)
        kept, why = [], []
        pieces, what = size // unit, f"{size // unit} units" if unit > 1 else str(size)
        for axis in axes:
            n = mesh_shape[axis]
            divisor = math.prod(mesh_shape[a] for a in kept) * n
            if axis in used:
                why.append(f"not split over {axis} ({axis} already shards dim {used[axis]})")
            elif size % unit:
                why.append(f"not split over {axis} ({size} is not a multiple of its unit {unit})")
            elif pieces % divisor:
                by = "·".join(kept + [axis]) + f"={divisor}" if kept else str(n)
                why.append(f"not split over {axis} ({what} not divisible by {by})")
            else:
                kept.append(axis)
        for axis in kept:
            used[axis] = dim
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
        if why:
            targets = " ".join(f"{a}={mesh_shape[a]}" for a in axes)
            sized = f"{size} = {pieces} units of {unit}" if unit > 1 and size % unit == 0 else str(size)
            left_out[dim] = f"{name} → {targets}, size {sized}: " + "; ".join(why)
    return PartitionSpec(*spec), left_out


def _variable_plan(variable: nnx.Variable, mesh_shape: Mapping[str, int]) -> tuple[PartitionSpec, dict[int, str]]:
    """`_plan` of one (possibly abstract) NNX variable from its `logical_axes` and `shard_units`
    metadata; a variable without `logical_axes` is replicated."""
    metadata = variable.get_metadata()
    if metadata.get("logical_axes") is None:
        return PartitionSpec(), {}
    return _plan(metadata["logical_axes"], variable.get_value().shape, mesh_shape, RULES,
                 metadata.get("shard_units"))


def variable_spec(variable: nnx.Variable, mesh_shape: Mapping[str, int]) -> PartitionSpec:
    """PartitionSpec of one (possibly abstract) NNX variable from its `logical_axes` metadata."""
    return _variable_plan(variable, mesh_shape)[0]


def variable_sharding(variable: nnx.Variable, mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, variable_spec(variable, dict(mesh.shape)))


def mesh_of(tree) -> Mesh:
    """The mesh the arrays of `tree` live on (a one-device mesh for arrays without a NamedSharding)."""
    shard = jax.tree.leaves(tree)[0].sharding
    if isinstance(shard, NamedSharding):
        return shard.mesh
    return make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=list(shard.device_set))


def state_shardings(state: nnx.State, mesh: Mesh | None) -> nnx.State:
    """NamedShardings for every variable of an (abstract) NNX state; `None` leaves without a mesh."""
    return jax.tree.map(lambda v: None if mesh is None else variable_sharding(v, mesh), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def follow_params(tree, params, mesh: Mesh):
    """Shardings for a tree holding copies of `params` (optimizer moments, say).

    A leaf whose key path ends with a parameter's key path and that has the parameter's shape takes the
    parameter's sharding; every other leaf (step counts, scalars) is replicated.
    """
    by_path = {key_names(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]}

    def pick(key_path, leaf):
        path = key_names(key_path)
        for i in range(len(path)):
            param = by_path.get(path[i:])
            if param is not None and tuple(param.shape) == tuple(leaf.shape):
                return param.sharding
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(pick, tree)


def overview(state: nnx.State, mesh: Mesh) -> tuple[list[str], list[str]]:
    """What the sharding rules make of an (abstract or concrete) state of NNX variables on `mesh`.

    Returns (table, warnings). `table`: a header, one line per variable (dotted name, shape, dtype and
    the PartitionSpec it gets on `mesh`) in aligned columns, and a total line (arrays, parameters,
    bytes, bytes per device), for the run's log. `warnings`, sorted: one line per dimension that its
    rule maps to mesh axes of size > 1 but that is left whole (or split over only some of them), with
    the reason; variables that differ only in layer numbers and share the reason share a line (one
    line, wrapped here):

      language_model.layers.{0..31}.self_attn.k_proj.kernel dim 1: kv_heads → tensor=16, size 1024 =
      8 units of 128: not split over tensor (8 units not divisible by 16)

    Mesh axes of size 1 never warn.
    """
    mesh_shape = dict(mesh.shape)
    rows, count, total, per_device = [("parameter", "shape", "dtype", "spec")], 0, 0, 0
    left_out: dict[str, list[tuple[str, ...]]] = {}  # "dim 1: why" -> names of the variables
    for path, variable in nnx.to_flat_state(state):
        name, value = key_names(path), variable.get_value()
        spec, why = _variable_plan(variable, mesh_shape)
        rows.append((".".join(name), str(tuple(value.shape)), str(np.dtype(value.dtype)), str(spec)))
        count += math.prod(value.shape)
        nbytes = math.prod(value.shape) * np.dtype(value.dtype).itemsize
        shards = math.prod(mesh_shape[a] for entry in spec if entry is not None
                           for a in ((entry,) if isinstance(entry, str) else entry))
        total, per_device = total + nbytes, per_device + nbytes // shards
        for dim, reason in why.items():
            left_out.setdefault(f"dim {dim}: {reason}", []).append(name)
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    table = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3] for row in rows]
    on = " × ".join(f"{a}={n}" for a, n in mesh_shape.items())
    table.append(f"{len(rows) - 1} arrays, {count:,} parameters, {_size(total)} ({_size(per_device)} per device "
                 f"on {on})")
    return table, sorted(f"{folded} {reason}" for reason, names in left_out.items() for folded in _fold(names))


def _size(nbytes: int) -> str:
    """`nbytes` in B, KiB, MiB, GiB or TiB, three significant digits."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024:
            break
        nbytes /= 1024
    else:
        unit = "TiB"
    return f"{nbytes:.3g} {unit}"


def _fold(names: list[tuple[str, ...]]) -> list[str]:
    """Dotted forms of `names` with numbered components folded into braces wherever the names differ only
    there: `layers.{0..3}.mlp` for layers 0-3, `layers.{0,2}.mlp`, `experts.{0..7}.layers.{0..3}.w` for
    a full grid (exact: each returned line stands for exactly the names it covers)."""
    entries = {tuple(frozenset([int(c)]) if c.isdigit() else c for c in name) for name in names}
    for i in reversed(range(max(map(len, entries), default=0))):
        merged: dict[tuple, set[int]] = {}
        rest = set()
        for entry in entries:
            if i < len(entry) and isinstance(entry[i], frozenset):
                merged.setdefault(entry[:i] + (None,) + entry[i + 1:], set()).update(entry[i])
            else:
                rest.add(entry)
        entries = rest | {key[:i] + (frozenset(ids),) + key[i + 1:] for key, ids in merged.items()}

    def braces(ids: frozenset[int]) -> str:
        if len(ids) == 1:
            return str(next(iter(ids)))
        runs = []
        for j in sorted(ids):
            if runs and j == runs[-1][1] + 1:
                runs[-1][1] = j
            else:
                runs.append([j, j])
        return "{" + ",".join(str(a) if a == b else f"{a}..{b}" for a, b in runs) + "}"

    return [".".join(braces(c) if isinstance(c, frozenset) else c for c in entry) for entry in entries]


def key_names(path) -> tuple[str, ...]:
    """The names along a pytree key path (DictKey, GetAttrKey, SequenceKey, FlattenedIndexKey entries)
    or an NNX path (strings and ints), as strings: `("language_model", "layers", "0", "mlp")`."""
    def name(k) -> str:
        if isinstance(k, jax.tree_util.DictKey | jax.tree_util.FlattenedIndexKey):
            return str(k.key)
        if isinstance(k, jax.tree_util.SequenceKey):
            return str(k.idx)
        if isinstance(k, jax.tree_util.GetAttrKey):
            return k.name
        return str(k)

    return tuple(name(k) for k in path)


def traced_on(mesh: Mesh, fn):
    """`fn` traced with `mesh` as the abstract mesh, so that its `shard_activation` constraints apply
    wherever it is jitted (without one they are no-ops and XLA guesses activation shardings)."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return wrapped


def target_platform() -> str:
    """The platform the program being traced is for: that of the abstract mesh's devices (`traced_on`,
    `jax.set_mesh`), else the default backend's. Choices that depend on the hardware (splash or its
    interpreter, `auto` attention) read this, not `jax.default_backend()`, so that a program compiled ahead
    of time for TPU chips on a CPU host (`rdpo_jax.compile`) is the TPU's program."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return device.platform if device is not None else jax.default_backend()


def axis_size(name: str) -> int:
    """The size of mesh axis `name` in the mesh being traced on (1 without a mesh or without that axis)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else dict(zip(mesh.axis_names, mesh.axis_sizes)).get(name, 1)


def gathered(x: jax.Array, logical_axes: Sequence[str | None] | None) -> jax.Array:
    """A parameter (its value `x`, its `logical_axes`: a stacked one's, whose leading names `x` may have lost
    to a layer scan) constrained to its sharding without "fsdp": FSDP's all-gather, made on `x` itself —
    e.g. a quantized weight's codes, which would otherwise travel dequantized, 4× their bytes. Unchanged
    without a traced mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names) or logical_axes is None:
        return x
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes), fsdp=1)
    return jax.lax.with_sharding_constraint(x, logical_to_spec(tuple(logical_axes)[-x.ndim:], x.shape, sizes))


def shard_activation(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Constrains an activation's sharding by logical names when tracing under a mesh (`jax.set_mesh`,
    or `traced_on`); without one it returns `x` unchanged."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    spec = logical_to_spec(logical_axes, x.shape, dict(zip(mesh.axis_names, mesh.axis_sizes)))
    return jax.lax.with_sharding_constraint(x, spec)
