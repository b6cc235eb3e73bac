"""The sparse MoE block (`models/moe.py`): its sorted, grouped dispatch equals a dense all-experts
computation, and compiled for a TPU its FLOPs per token follow top-k, not the number of experts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import topologies

from rdpo_jax import sharding
from rdpo_jax.compile import analysis
from rdpo_jax.models import layers, lora, moe
from rdpo_jax.models.config import MoEConfig


def _block(experts: int, top_k: int, dim: int = 64, inter: int = 40, dtype=jnp.float32):
    cfg = MoEConfig(num_experts=experts, top_k=top_k, intermediate_size=inter, layers=(0,), aux_loss_coef=0.0)
    return moe.SparseMoE(dim, cfg, "silu", param_dtype=dtype, dtype=dtype, rngs=layers.InitKeys(jax.random.key(0)))


def test_dispatch_equals_every_expert_weighted_densely():
    block = _block(6, 3)
    x = jax.random.normal(jax.random.key(1), (2, 9, 64))
    got, (probs, chosen) = block(x)
    top = jnp.take_along_axis(probs, chosen, -1)
    gate = jnp.zeros_like(probs).at[jnp.arange(18)[:, None], chosen].set(top / top.sum(-1, keepdims=True))
    w1, w2 = block.experts.gate_up_proj[...], block.experts.down_proj[...]
    g, u = jnp.split(jnp.einsum("nd,edf->enf", x.reshape(18, 64), w1), 2, -1)
    every = jnp.einsum("enf,efd->end", jax.nn.silu(g) * u, w2)  # [E, N, D]
    np.testing.assert_allclose(np.asarray(got).reshape(18, 64), np.asarray(jnp.einsum("ne,end->nd", gate, every)),
                               rtol=1e-5, atol=1e-6)
    # a token's probabilities sum to 1 and its k experts are distinct
    np.testing.assert_allclose(np.asarray(probs.sum(-1)), 1.0, rtol=1e-6)
    assert all(len(set(r)) == 3 for r in np.asarray(chosen).tolist())


def _tpu_flops(experts: int, top_k: int, rank: int = 0, dim: int = 256, inter: int = 384) -> float:
    """XLA:TPU's FLOP count of one block's forward and backward (parameters' gradients) over 2048 tokens
    (compiled, not run); with `rank`, LoRA adapters of that rank on the experts."""
    block = _block(experts, top_k, dim=dim, inter=inter, dtype=jnp.bfloat16)
    if rank:
        lora.attach(block, lora.LoRASettings(rank=rank, targets=("experts/.*",)), layers.InitKeys(jax.random.key(1)))
    graphdef, params = nnx.split(block)
    device = topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu").devices[0]
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=[device])
    one = jax.sharding.SingleDeviceSharding(device)

    def loss(params, x):
        return nnx.merge(graphdef, params)(x)[0].astype(jnp.float32).sum()

    x = jax.ShapeDtypeStruct((2, 1024, dim), jnp.bfloat16)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    with jax.set_mesh(mesh):  # a TPU target: the megablox kernels
        lowered = jax.jit(jax.grad(loss), in_shardings=(one, one), out_shardings=one).lower(abstract, x)
        counted, _ = analysis.matmul_flops(jax.make_jaxpr(jax.grad(loss))(abstract, x))
    return lowered.compile().cost_analysis()["flops"], counted


def test_tpu_flops_follow_top_k_not_the_number_of_experts():
    """64 experts at top-4 compile (megablox forward and backward) to the expert matmuls of 4 experts per
    token, the weights' gradient included (ragged_dot's is dense over every expert on TPU: 16× that);
    only the router's D·E per token depends on E."""
    flops, counted = _tpu_flops(64, 4)
    # per assignment, matmuls of D·I at 2 FLOPs each: forward 3 (gate, up, down), the weights' gradients 3,
    # the activations' gradient 1 (down's; the block's input is no parameter)
    expert = 2 * 256 * 384 * 7 * 2048
    assert flops == pytest.approx(4 * expert, rel=0.05)
    # the compile report's count, from the kernels' own estimates: an upper bound (megablox's backward
    # computes the block input's gradient, which XLA then drops), far from the 16× of every expert
    assert 4 * expert <= counted <= 1.35 * 4 * expert


def test_tpu_flops_of_expert_adapters_follow_top_k_too():
    """Rank-16 adapters on 64 experts: their grouped matmuls, padded to megablox's 128, cost the rows' work
    at rank 128 — r'·(5D + 9I) per assignment over forward and backward beside the experts' 7·D·I —
    not ragged_dot's dense-over-experts weight gradients (3.65× the block at E = 64 with D = 256, I = 384,
    growing with E)."""
    flops, _ = _tpu_flops(64, 4, rank=16, dim=128, inter=128)
    expert = 2 * 128 * 128 * 7 * 2048
    adapters = 2 * 128 * (5 * 128 + 9 * 128) * 2048
    assert flops == pytest.approx(4 * (expert + adapters), rel=0.05)


def test_flop_count_of_ragged_dot_is_the_rows_work():
    """`compile.analysis.matmul_flops` counts the CPU path's grouped matmuls (`ragged_dot`, forward and both
    gradients) as the rows' work: a block at top-3 of 6 experts is 3 experts' SwiGLU per token."""
    block = _block(6, 3)
    graphdef, params = nnx.split(block)
    x = jnp.ones((2, 9, 64))
    counted, _ = analysis.matmul_flops(jax.make_jaxpr(jax.grad(
        lambda p, x: nnx.merge(graphdef, p)(x)[0].sum(), argnums=(0, 1)))(params, x))
    router = 2 * 18 * 64 * 6 * 3  # forward, and both gradients
    assert counted == 2 * 64 * 40 * 3 * 18 * 3 * 3 + router  # 3 matmuls × 3 passes × 3 experts × 18 tokens


def test_expert_parallel_block_compiles_for_tpu():
    """The block's forward and backward with its experts split over an expert axis of a TPU slice (4 chips:
    fsdp 2 × expert 2), megablox kernels inside the all-to-all shard_map: it lowers and compiles, and
    the program moves tokens by all-to-all."""
    block = _block(8, 2, dim=256, inter=384, dtype=jnp.bfloat16)
    graphdef, params = nnx.split(block)
    devices = topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu").devices
    mesh = sharding.make_mesh({"fsdp": 2, "expert": 2}, devices=devices)

    def loss(params, x):
        return nnx.merge(graphdef, params)(x)[0].astype(jnp.float32).sum()

    x = jax.ShapeDtypeStruct((4, 256, 256), jnp.bfloat16)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    with jax.set_mesh(mesh):
        hlo = jax.jit(sharding.traced_on(mesh, jax.grad(loss))).lower(abstract, x).compile().as_text()
    assert "all-to-all" in hlo and "tpu_custom_call" in hlo
