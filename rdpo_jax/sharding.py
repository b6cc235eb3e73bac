"""Device mesh and the one table that maps logical axis names to mesh axes.

Every parameter carries `logical_axes` metadata (e.g. `("embed", "mlp")`); activations are constrained
with logical names too. `RULES` turns a logical name into mesh axes of the mesh
`("data", "fsdp", "tensor")`:

  data    pure data parallelism (parameters replicated along it),
  fsdp    data parallelism with parameters and optimizer state sharded along it (ZeRO-3 style),
  tensor  Megatron-style tensor parallelism over heads, MLP width and vocabulary.

A dimension whose size is not divisible by its mesh axes falls back to replication on those axes (a
vision tower's 1152-wide MLP on a 16-way tensor axis, say); a mesh axis is used at most once per array.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis, tuple of mesh axes, or None (replicated).
RULES: dict[str, str | tuple[str, ...] | None] = {
    # activations
    "batch": ("data", "fsdp"),
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
    "norm": None,
    "patch": None,
    "position": None,
}


def mesh_sizes(shape: Mapping[str, int] | Sequence[int], num_devices: int) -> dict[str, int]:
    """Axis sizes of the `("data", "fsdp", "tensor")` mesh for `num_devices` devices.

    `shape` maps axes to sizes (`{"data": -1, "fsdp": 4, "tensor": 2}`) or lists the three sizes; one
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


def make_mesh(shape: Mapping[str, int] | Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the `("data", "fsdp", "tensor")` mesh (Auto axes) over `devices` (default: all); see
    `mesh_sizes` for `shape`."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_sizes(shape, len(devices))
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
    if len(logical_axes) != len(shape) or (units is not None and len(units) != len(shape)):
        raise ValueError(f"logical axes {tuple(logical_axes)} (units {units}) do not match shape {tuple(shape)}")
    units = units or (1,) * len(shape)
    used: set[str] = set()
    spec = []
    for name, size, unit in zip(logical_axes, shape, units):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no entry in the sharding rules {sorted(rules)}")
        target = rules[name]
        axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        kept = []
        for axis in axes:
            n = mesh_shape.get(axis, 1)
            if axis in used or n == 1:
                continue
            if size % unit == 0 and (size // unit) % (math.prod(mesh_shape[a] for a in kept) * n) == 0:
                kept.append(axis)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def variable_spec(variable: nnx.Variable, mesh_shape: Mapping[str, int]) -> PartitionSpec:
    """PartitionSpec of one (possibly abstract) NNX variable from its `logical_axes` metadata."""
    value = variable.get_value()
    axes = variable.get_metadata().get("logical_axes")
    if axes is None:
        return PartitionSpec()
    return logical_to_spec(axes, value.shape, mesh_shape, units=variable.get_metadata().get("shard_units"))


def variable_sharding(variable: nnx.Variable, mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, variable_spec(variable, dict(mesh.shape)))


def state_shardings(state: nnx.State, mesh: Mesh | None) -> nnx.State:
    """NamedShardings for every variable of an (abstract) NNX state; `None` leaves without a mesh."""
    return jax.tree.map(lambda v: None if mesh is None else variable_sharding(v, mesh), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def follow_params(tree, params, mesh: Mesh):
    """Shardings for a tree holding copies of `params` (optimizer moments, say).

    A leaf whose key path ends with a parameter's key path and that has the parameter's shape takes the
    parameter's sharding; every other leaf (step counts, scalars) is replicated.
    """
    def names(key_path):
        return tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in key_path)

    by_path = {names(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]}

    def pick(key_path, leaf):
        path = names(key_path)
        for i in range(len(path)):
            param = by_path.get(path[i:])
            if param is not None and tuple(param.shape) == tuple(leaf.shape):
                return param.sharding
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(pick, tree)


def traced_on(mesh: Mesh, fn):
    """`fn` traced with `mesh` as the abstract mesh, so that its `shard_activation` constraints apply
    wherever it is jitted (without one they are no-ops and XLA guesses activation shardings)."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return wrapped


def shard_activation(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Constrains an activation's sharding by logical names when tracing under a mesh (`jax.set_mesh`,
    or `traced_on`); without one it returns `x` unchanged."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    spec = logical_to_spec(logical_axes, x.shape, dict(zip(mesh.axis_names, mesh.axis_sizes)))
    return jax.lax.with_sharding_constraint(x, spec)


def describe(state: nnx.State) -> list[tuple[str, tuple[int, ...], str]]:
    """(path, shape, sharding spec) per array of a concrete state: what `--print_shardings` shows."""
    rows = []
    for path, v in nnx.to_flat_state(state):
        value = v.get_value()
        spec = getattr(getattr(value, "sharding", None), "spec", None)
        rows.append((".".join(map(str, path)), tuple(np.shape(value)), str(spec)))
    return rows
