"""Mesh construction, the logical-axis rules and the sharding overview."""

import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from rdpo_jax import optim, sharding
from rdpo_jax.models import config as config_lib
from rdpo_jax.models import families
from tests import tiny


def test_make_mesh_fills_minus_one_and_uses_auto_axes():
    mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert dict(sharding.make_mesh([1, 8, 1, 1]).shape) == {"data": 1, "fsdp": 8, "expert": 1, "tensor": 1}


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


def _tiny_params(vocab: int = tiny.VOCAB):
    """The nnx.Param state of the abstract tiny CLIP + Llama (GQA 8/2, head_dim 8) with `vocab` tokens."""
    hf = tiny.hf_config("clip_llama")
    hf.text_config.vocab_size = vocab
    return nnx.state(families.abstract_model(families.from_hf(hf)), nnx.Param)


def test_overview_tables_every_parameter_and_names_the_dims_left_whole():
    params = _tiny_params(vocab=162)  # 162 is not divisible by tensor=4; 2 KV heads are not either
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    table, warnings = sharding.overview(params, mesh)
    flat = nnx.to_flat_state(params)
    assert table[0].split() == ["parameter", "shape", "dtype", "spec"]
    assert len(table) == len(flat) + 2
    assert len({line.index(" P(") for line in table[1:-1]}) == 1  # aligned columns
    rows = {}
    for line, (path, v) in zip(table[1:-1], flat):
        cells = re.split(r"\s{2,}", line)
        assert cells == [".".join(map(str, path)), str(v.get_value().shape), "float32",
                         str(sharding.variable_spec(v, dict(mesh.shape)))]
        rows[cells[0]] = cells[1:]
    assert rows["language_model.embed_tokens.embedding"] == ["(162, 64)", "float32", "P(None, 'fsdp')"]
    assert rows["language_model.layers.1.self_attn.k_proj.kernel"] == ["(64, 16)", "float32", "P('fsdp', None)"]
    assert rows["language_model.layers.1.self_attn.q_proj.kernel"][-1] == "P('fsdp', 'tensor')"
    n = sum(v.get_value().size for _, v in flat)
    assert table[-1].startswith(f"{len(flat)} arrays, {n:,} parameters, ")
    assert table[-1].endswith("per device on data=1 × fsdp=2 × expert=1 × tensor=4)")

    assert [w.split(":")[0] for w in warnings] == [
        "language_model.embed_tokens.embedding dim 0",
        "language_model.layers.{0..1}.self_attn.k_proj.kernel dim 1",
        "language_model.layers.{0..1}.self_attn.v_proj.kernel dim 1",
        "lm_head.kernel dim 1",
    ]
    assert warnings[0].endswith("dim 0: vocab → tensor=4, size 162: not split over tensor "
                                "(162 not divisible by 4)")
    assert warnings[1].endswith("dim 1: kv_heads → tensor=4, size 16 = 2 units of 8: not split over tensor "
                                "(2 units not divisible by 4)")


@pytest.mark.parametrize("shape", [{"data": 2, "fsdp": 2, "tensor": 2}, {"data": 1, "fsdp": 8, "tensor": 1},
                                   {"data": 8, "fsdp": 1, "tensor": 1}])
def test_overview_warns_nothing_when_everything_divides(shape):
    params = _tiny_params()
    table, warnings = sharding.overview(params, sharding.make_mesh(shape))
    assert warnings == []
    assert len(table) == len(nnx.to_flat_state(params)) + 2


def test_overview_reasons_and_folding():
    def param(shape, axes):
        return nnx.Param(jax.ShapeDtypeStruct(shape, jnp.bfloat16), logical_axes=axes)

    state = nnx.State({
        "both": param((8, 8), ("heads", "mlp")),  # tensor is taken by dim 0
        "rows": param((6, 4), ("batch", None)),  # 6 splits over data=2, not over data·fsdp=4
        "plain": nnx.Param(jax.ShapeDtypeStruct((3,), jnp.float32)),  # no logical axes: replicated, silent
        "layers": {i: {"w": param((3,), ("mlp",))} for i in (0, 1, 2, 3, 5)},
        "experts": {0: {"layers": {0: {"w": param((3,), ("mlp",))}, 1: {"w": param((3,), ("mlp",))}}},
                    1: {"layers": {0: {"w": param((3,), ("mlp",))}}}},
    })
    table, warnings = sharding.overview(state, sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
    rows = {cells[0]: cells[1:] for cells in (re.split(r"\s{2,}", line) for line in table[1:-1])}
    assert len(rows) == 11
    assert rows["both"] == ["(8, 8)", "bfloat16", "P('tensor', None)"]
    assert rows["rows"] == ["(6, 4)", "bfloat16", "P('data', None)"]
    assert rows["plain"] == ["(3,)", "float32", "P()"]
    whole = "dim 0: mlp → tensor=2, size 3: not split over tensor (3 not divisible by 2)"
    assert warnings == [
        "both dim 1: mlp → tensor=2, size 8: not split over tensor (tensor already shards dim 0)",
        f"experts.0.layers.{{0..1}}.w {whole}",
        f"experts.1.layers.0.w {whole}",
        f"layers.{{0..3,5}}.w {whole}",
        "rows dim 0: batch → data=2 fsdp=2, size 6: not split over fsdp (6 not divisible by data·fsdp=4)",
    ]


def test_key_names_reads_jax_key_paths_and_nnx_paths():
    tu = jax.tree_util
    path = (tu.GetAttrKey("params"), tu.DictKey("layers"), tu.SequenceKey(0), tu.FlattenedIndexKey(2))
    assert sharding.key_names(path) == ("params", "layers", "0", "2")
    assert sharding.key_names(("language_model", "layers", 3, "mlp")) == ("language_model", "layers", "3", "mlp")
    assert optim.path_str(path) == "params/layers/0/2"
    kp = jax.tree_util.tree_flatten_with_path({"a": [{"b": 1}, {"b": 2}]})[0][1][0]
    assert optim.tree_get({"a": {"0": {"b": 5}, "1": {"b": 7}}}, kp, "x") == 7
    with pytest.raises(ValueError, match="x: parameter a/1/b is in one model but not the other"):
        optim.tree_get({"a": {"0": {"b": 5}}}, kp, "x")
