"""Mesh construction and the logical-axis rules."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from rdpo_jax import sharding


def test_make_mesh_fills_minus_one_and_uses_auto_axes():
    mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert dict(sharding.make_mesh([1, 8, 1]).shape) == {"data": 1, "fsdp": 8, "tensor": 1}


@pytest.mark.parametrize("shape,match", [
    ({"data": 4, "fsdp": 4}, "needs 16 devices, but 8 are available"),
    ({"data": -1, "fsdp": 3}, "not divisible"),
    ({"data": -1, "fsdp": -1}, "at most one -1"),
    ({"model": 2}, "unknown axis"),
])
def test_make_mesh_errors(shape, match):
    with pytest.raises(ValueError, match=match):
        sharding.make_mesh(shape)


def test_logical_to_spec_rules_and_fallbacks():
    mesh = {"data": 1, "fsdp": 2, "tensor": 4}
    assert sharding.logical_to_spec(("embed", "mlp"), (64, 96), mesh) == P("fsdp", "tensor")
    assert sharding.logical_to_spec(("vocab", "embed"), (160, 64), mesh) == P("tensor", "fsdp")
    # 30 is not divisible by 4: that dimension is replicated instead of failing.
    assert sharding.logical_to_spec(("embed", "mlp"), (64, 30), mesh) == P("fsdp", None)
    # batch maps to (data, fsdp); a size-1 mesh axis is left out.
    assert sharding.logical_to_spec(("batch", "seq", "act_embed"), (8, 5, 64), mesh) == P("fsdp", None, None)
    assert sharding.logical_to_spec(("batch", None), (8, 3), {"data": 2, "fsdp": 4, "tensor": 1}) == P(("data", "fsdp"), None)
    # a mesh axis is used once per array
    assert sharding.logical_to_spec(("heads", "mlp"), (8, 8), mesh) == P("tensor", None)
    # units: a heads × head_dim dimension shards by whole heads (2 KV heads of 16 on 4 devices: replicated)
    assert sharding.logical_to_spec(("embed", "kv_heads"), (64, 32), mesh, units=(1, 16)) == P("fsdp", None)
    assert sharding.logical_to_spec(("embed", "kv_heads"), (64, 32), mesh) == P("fsdp", "tensor")
    assert sharding.logical_to_spec(("heads", "embed"), (64, 64), mesh, units=(16, 1)) == P("tensor", "fsdp")
    with pytest.raises(ValueError, match="units"):
        sharding.logical_to_spec(("embed",), (64,), mesh, units=(1, 16))
    with pytest.raises(KeyError, match="'embedding' has no entry"):
        sharding.logical_to_spec(("embedding",), (4,), mesh)
