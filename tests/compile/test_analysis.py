"""compile.analysis: matmul FLOPs counted under scan, remat, shard_map, cond, while and Pallas grids;
collectives of HLO text (handwritten, and XLA:TPU's for a v5p topology) counted under loops."""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax import lax
from jax.experimental import pallas as pl
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rdpo_jax.compile import analysis

M, K, N = 16, 32, 8


def test_matmul_and_convolution():
    x, w = jnp.ones((M, K)), jnp.ones((K, N))
    assert analysis.matmul_flops(jax.make_jaxpr(jnp.matmul)(x, w)) == (2 * M * K * N,) * 2
    # Grouped convolution: each of the 2·6·6·6 outputs contracts 4/2 input channels × a 3×3 window.
    conv = functools.partial(lax.conv_general_dilated, window_strides=(1, 1), padding="VALID", feature_group_count=2)
    jaxpr = jax.make_jaxpr(conv)(jnp.ones((2, 4, 8, 8)), jnp.ones((6, 2, 3, 3)))
    assert analysis.matmul_flops(jaxpr) == (2 * (2 * 6 * 6 * 6) * (2 * 3 * 3),) * 2


def test_scan_counts_its_body_length_times():
    L = 7
    step = lambda c, w: (c @ w @ w.T, None)  # noqa: E731 - two matmuls of 2·M·K·N each
    jaxpr = jax.make_jaxpr(lambda c, ws: lax.scan(step, c, ws)[0])(jnp.ones((M, K)), jnp.ones((L, K, N)))
    assert analysis.matmul_flops(jaxpr) == (L * 4 * M * K * N, 4 * M * K * N)


@pytest.mark.parametrize("remat, passes", [(False, 3), (True, 4)])
def test_grad_of_scanned_mlp(remat, passes):
    """Per layer y = tanh(x @ W): the forward matmul (2·B·D²), its two cotangent matmuls dx = g @ Wᵀ and
    dW = xᵀ @ g (2·B·D² each) — 3 forward passes' worth — and under `jax.checkpoint` (policy: save nothing)
    the backward scan recomputes x @ W first: 4. The first layer's dx is computed too: a scan body is one
    program for all iterations."""
    B, D, L = 4, 8, 3
    layer = lambda c, w: (jnp.tanh(c @ w), None)  # noqa: E731

    def loss(ws, x):
        return lax.scan(jax.checkpoint(layer) if remat else layer, x, ws)[0].sum()

    total, once = analysis.matmul_flops(jax.make_jaxpr(jax.grad(loss))(jnp.ones((L, D, D)), jnp.ones((B, D))))
    assert (total, once) == (passes * L * 2 * B * D * D, passes * 2 * B * D * D)


@pytest.mark.parametrize("manual", [("a", "b"), ("a",)])
def test_shard_map_counts_every_device(manual):
    """The body sees per-device shapes; only its manual axes multiply (over "a" alone, "b" stays global)."""
    mesh = jax.make_mesh((4, 2), ("a", "b"), axis_types=(AxisType.Auto,) * 2)
    body = jax.shard_map(jnp.matmul, mesh=mesh, in_specs=(P(manual), P()), out_specs=P(manual),
                         axis_names=set(manual))
    jaxpr = jax.make_jaxpr(body)(jnp.ones((M, K)), jnp.ones((K, N)))
    assert analysis.matmul_flops(jaxpr) == (2 * M * K * N,) * 2


def test_cond_counts_the_costlier_branch_and_while_its_body_once():
    x = jnp.ones((M, M))
    cond = jax.make_jaxpr(lambda p, x: lax.cond(p, lambda x: x @ x @ x, lambda x: x @ x, x))(True, x)
    assert analysis.matmul_flops(cond) == (4 * M**3,) * 2
    loop = jax.make_jaxpr(lambda n, x: lax.fori_loop(0, n, lambda i, x: x @ x, x))(5, x)  # n traced: a while
    assert analysis.matmul_flops(loop) == (2 * M**3,) * 2


def test_pallas_kernel_counts_every_grid_step():
    def kernel(x_ref, w_ref, o_ref):
        o_ref[...] = x_ref[...] @ w_ref[...]

    mm = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((M, N), jnp.float32), grid=(2, 2),
                        in_specs=[pl.BlockSpec((M // 2, K), lambda i, j: (i, 0)),
                                  pl.BlockSpec((K, N // 2), lambda i, j: (0, j))],
                        out_specs=pl.BlockSpec((M // 2, N // 2), lambda i, j: (i, j)), interpret=True)
    assert analysis.matmul_flops(jax.make_jaxpr(mm)(jnp.ones((M, K)), jnp.ones((K, N)))) == (2 * M * K * N,) * 2


# A while with a known trip count (28) holding an all-reduce and a scan-shaped while (i from 0 while i < 3,
# i + 1) holding an async all-gather; a while whose trip count cannot be read, holding an all-to-all; an
# async collective-permute; an async-wrapped reduce-scatter inside a `call`, and one as XLA:TPU fuses it; a
# loop counting by 2 (XLA:TPU's collective matmul) around an instruction written over two lines. `to_apply` of a reduction names
# its reducer.
HLO = """\
HloModule handwritten, entry_computation_layout={(f32[1024]{0}, bf16[16,64]{1,0})->f32[1024]{0}}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%cond2 (c: (s32[], bf16[16,64])) -> pred[] {
  %c = (s32[], bf16[16,64]{1,0}) parameter(0)
  %ci = s32[] get-tuple-element(%c), index=0
  %three = s32[] constant(3)
  ROOT %lt = pred[] compare(%ci, %three), direction=LT
}

%body2 (q: (s32[], bf16[16,64])) -> (s32[], bf16[16,64]) {
  %q = (s32[], bf16[16,64]{1,0}) parameter(0)
  %qi = s32[] get-tuple-element(%q), index=0
  %one = s32[] constant(1)
  %next = s32[] add(%qi, %one)
  %qx = bf16[16,64]{1,0:T(8,128)(2,1)} get-tuple-element(%q), index=1
  %ags = (bf16[16,64]{1,0:T(8,128)(2,1)}, bf16[64,64]{1,0:T(8,128)(2,1)}) all-gather-start(%qx), dimensions={0}
  %agd = bf16[64,64]{1,0:T(8,128)(2,1)} all-gather-done(%ags)
  %part = bf16[16,64]{1,0} slice(%agd), slice={[0:16], [0:64]}
  ROOT %t2 = (s32[], bf16[16,64]{1,0}) tuple(%next, %part)
}

%cond1 (c1: (s32[], f32[1024], bf16[16,64], s32[])) -> pred[] {
  %c1 = (s32[], f32[1024]{0}, bf16[16,64]{1,0}, s32[]) parameter(0)
  %c1i = s32[] get-tuple-element(%c1), index=0
  %c1n = s32[] get-tuple-element(%c1), index=3
  ROOT %lt1 = pred[] compare(%c1i, %c1n), direction=LT
}

%body1 (p: (s32[], f32[1024], bf16[16,64], s32[])) -> (s32[], f32[1024], bf16[16,64], s32[]) {
  %p = (s32[], f32[1024]{0}, bf16[16,64]{1,0}, s32[]) parameter(0)
  %pi = s32[] get-tuple-element(%p), index=0
  %px = f32[1024]{0} get-tuple-element(%p), index=1
  %py = bf16[16,64]{1,0} get-tuple-element(%p), index=2
  %pn = s32[] get-tuple-element(%p), index=3
  %ar = f32[1024]{0} all-reduce(%px), replica_groups={{0,1,2,3}}, to_apply=%add
  %zero2 = s32[] constant(0)
  %zero2c = s32[] copy(%zero2)
  %init2 = (s32[], bf16[16,64]{1,0}) tuple(%zero2c, %py)
  %w2 = (s32[], bf16[16,64]{1,0}) while(%init2), condition=%cond2, body=%body2
  %y2 = bf16[16,64]{1,0} get-tuple-element(%w2), index=1
  %one1 = s32[] constant(1)
  %next1 = s32[] add(%pi, %one1)
  ROOT %t1 = (s32[], f32[1024]{0}, bf16[16,64]{1,0}, s32[]) tuple(%next1, %ar, %y2, %pn)
}

%body3 (r: (s32[], s32[], f32[16])) -> (s32[], s32[], f32[16]) {
  %r = (s32[], s32[], f32[16]{0}) parameter(0)
  %ri = s32[] get-tuple-element(%r), index=0
  %rn = s32[] get-tuple-element(%r), index=1
  %rx = f32[16]{0} get-tuple-element(%r), index=2
  %a2a = f32[16]{0} all-to-all(%rx), dimensions={0}
  %two = s32[] constant(2)
  %next3 = s32[] multiply(%ri, %two)
  ROOT %t3 = (s32[], s32[], f32[16]{0}) tuple(%next3, %rn, %a2a)
}

%cond4 (c4: (u32[], f32[4])) -> pred[] {
  %c4 = (u32[], f32[4]{0}) parameter(0)
  %c4i = u32[] get-tuple-element(%c4), index=0
  %sixteen = u32[] constant(16)
  ROOT %lt4 = pred[] compare(%c4i, %sixteen), direction=LT
}

%body4 (b4: (u32[], f32[4])) -> (u32[], f32[4]) {
  %b4 = (u32[], f32[4]{0}) parameter(0)
  %b4x = f32[4]{0} get-tuple-element(%b4), index=1
  %b4cp = f32[4]{0} collective-permute(%b4x), source_target_pairs={{0,1},{1,0}}, backend_config={"a":{
}}, metadata={op_name="a config written over two lines"}
  %stride = u32[] constant(2)
  %b4i = u32[] get-tuple-element(%b4), index=0
  %b4next = u32[] add(%stride, %b4i)
  ROOT %t4 = (u32[], f32[4]{0}) tuple(%b4next, %b4cp)
}

%cond3 (c3: (s32[], s32[], f32[16])) -> pred[] {
  %c3 = (s32[], s32[], f32[16]{0}) parameter(0)
  %c3i = s32[] get-tuple-element(%c3), index=0
  %c3n = s32[] get-tuple-element(%c3), index=1
  ROOT %lt3 = pred[] compare(%c3i, %c3n), direction=LT
}

%wrapped_scatter (w: f32[1024]) -> f32[256] {
  %w = f32[1024]{0} parameter(0)
  ROOT %rs = f32[256]{0} reduce-scatter(%w), dimensions={0}, to_apply=%add
}

%scatter (s: f32[1024]) -> f32[256] {
  %s = f32[1024]{0} parameter(0)
  %rss = ((f32[1024]{0}), f32[256]{0}, u32[]) async-start(%s), calls=%wrapped_scatter
  ROOT %rsd = f32[256]{0} async-done(%rss), calls=%wrapped_scatter
}

%all-reduce-scatter.1 (g: bf16[64,64]) -> bf16[16,64] {
  %g = bf16[64,64]{1,0} parameter(0)
  %gar = bf16[64,64]{1,0} all-reduce(%g), replica_groups={{0,1,2,3}}, to_apply=%add
  %gzero = u32[] constant(0)
  %gpid = u32[] partition-id()
  %gsix = u32[] constant(16)
  %goff = u32[] multiply(%gpid, %gsix)
  ROOT %gds = bf16[16,64]{1,0} dynamic-slice(%gar, %goff, %gzero), dynamic_slice_sizes={16,64}
}

ENTRY %main (x: f32[1024], y: bf16[16,64]) -> f32[1024] {
  %x = f32[1024]{0} parameter(0)
  %y = bf16[16,64]{1,0} parameter(1)
  %zero = s32[] constant(0)
  %n1 = s32[] constant(28)
  %init1 = (s32[], f32[1024]{0}, bf16[16,64]{1,0}, s32[]) tuple(%zero, %x, %y, %n1)
  %w1 = (s32[], f32[1024]{0}, bf16[16,64]{1,0}, s32[]) while(%init1), condition=%cond1, body=%body1, backend_config={"known_trip_count":{"n":"28"}}
  %x1 = f32[1024]{0} get-tuple-element(%w1), index=1
  %s8 = f32[8]{0} slice(%x1), slice={[0:8]}
  %cps = (f32[8]{0}, f32[8]{0}, u32[], u32[]) collective-permute-start(%s8), source_target_pairs={{0,1},{1,0}}
  %cpd = f32[8]{0} collective-permute-done(%cps)
  %one = s32[] constant(1)
  %x16 = f32[16]{0} slice(%x1), slice={[0:16]}
  %init3 = (s32[], s32[], f32[16]{0}) tuple(%one, %n1, %x16)
  %w3 = (s32[], s32[], f32[16]{0}) while(%init3), condition=%cond3, body=%body3
  %start4 = u32[] constant(0)
  %x4 = f32[4]{0} slice(%x1), slice={[0:4]}
  %init4 = (u32[], f32[4]{0}) tuple(%start4, %x4)
  %w4 = (u32[], f32[4]{0}) while(%init4), condition=%cond4, body=%body4
  %scattered = f32[256]{0} call(%x1), to_apply=%scatter
  %grad = bf16[64,64]{1,0} broadcast(%y), dimensions={}
  %fused = bf16[16,64]{1,0} fusion(%grad), kind=kCustom, calls=%all-reduce-scatter.1
  ROOT %out = f32[1024]{0} copy(%x1)
}
"""


def test_collectives_of_handwritten_hlo():
    got = analysis.collectives(HLO)
    assert got["all-reduce"] == {"count": 28, "bytes": 28 * 1024 * 4, "ops": 1}
    assert got["all-gather"] == {"count": 28 * 3, "bytes": 28 * 3 * 64 * 64 * 2, "ops": 1}  # output only
    # the async one (output only), and 16 / 2 = 8 runs of a collective-matmul loop counting by 2
    assert got["collective-permute"] == {"count": 1 + 8, "bytes": 8 * 4 + 8 * 4 * 4, "ops": 2}
    # the async-wrapped one, and XLA:TPU's fusion of an all-reduce and this device's slice (its shard's bytes)
    assert got["reduce-scatter"] == {"count": 2, "bytes": 256 * 4 + 16 * 64 * 2, "ops": 2}
    assert got["all-to-all"] == {"count": 1, "bytes": 16 * 4, "ops": 1}
    assert got["unknown_trip_counts"] == {"whiles": ["w3"]}


@pytest.mark.parametrize("shape, size", [
    ("bf16[64,64]{1,0:T(8,128)(2,1)}", 8192), ("(f32[2], bf16[4,4])", 40), ("pred[]", 1), ("c128[3]", 48),
    ("(s32[]{:T(128)}, /*index=5*/u8[10])", 14)])
def test_shape_bytes(shape, size):
    assert analysis.shape_bytes(shape) == size


def test_collectives_of_a_tpu_compile(tpu_env):
    """XLA:TPU for 4 v5p chips: a scan of 5 steps gathering its sharded weight slice in each step. The
    compiled while carries no `known_trip_count`; the count is read from the loop's shape."""
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu").devices
    mesh = Mesh(devices, ("d",), axis_types=(AxisType.Auto,))
    L, D = 5, 256

    def f(ws, x):
        def body(c, w):
            return jnp.tanh(c @ lax.with_sharding_constraint(w, NamedSharding(mesh, P()))), None

        return lax.scan(body, x, ws)[0]

    ws = jax.ShapeDtypeStruct((L, D, D), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, "d")))
    x = jax.ShapeDtypeStruct((64, D), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
    text = jax.jit(f).lower(ws, x).compile().as_text()
    assert " while(" in text
    got = analysis.collectives(text)
    assert got["all-gather"] == {"count": L, "bytes": L * D * D * 2, "ops": 1}  # one whole weight per step
    assert got["unknown_trip_counts"] == {"whiles": []}
    assert sum(got[k]["count"] for k in analysis.KINDS) == L
