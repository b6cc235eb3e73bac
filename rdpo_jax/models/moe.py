"""Sparse mixture-of-experts feed-forward block (transformers' `Qwen3VLMoeTextSparseMoeBlock`).

A linear router scores the E experts per token; softmax in float32, the top k kept and renormalized to
sum to 1. Tokens are dispatched dropless by sorting their k (token, expert) assignments by expert and
running each expert's SwiGLU over its contiguous group as grouped matmuls (`grouped_matmul`: on TPU
Pallas' megablox kernels, whose FLOPs forward and backward are those of the k experts each token uses,
not of all E; elsewhere `jax.lax.ragged_dot`, which XLA:CPU lowers densely, E× the work: fine for the
tests' tiny models). The weighted outputs are summed back
per token by a scatter-add.

Experts are stacked weights: `experts.gate_up_proj` float[E, D, 2I] (gate columns first) and
`experts.down_proj` float[E, I, D] — the Hub's layout ([E, in, out]); transformers 5 keeps [E, out, in]
in memory and saves it so, and `models/hf.py` reads either by shape.

The block also returns what the load-balancing loss needs (`router_stats`, `aux_loss`): per expert the
number of top-k assignments and the summed router probabilities over the real tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rdpo_jax.models import layers
from rdpo_jax.models.config import MoEConfig
from rdpo_jax.models.layers import Linear
from rdpo_jax import sharding
from rdpo_jax.sharding import shard_activation


class Experts(nnx.Module):
    def __init__(self, num: int, dim: int, inter: int, act: str, *, param_dtype, dtype, rngs: layers.InitKeys):
        self.gate_up_proj = layers.param(rngs, layers._normal, (num, dim, 2 * inter), param_dtype,
                                         ("expert", "expert_embed", "expert_mlp"))
        self.down_proj = layers.param(rngs, layers._normal, (num, inter, dim), param_dtype,
                                      ("expert", "expert_mlp", "expert_embed"))
        self.act, self.dtype = layers.activation(act), dtype

    def __call__(self, x: jax.Array, sizes: jax.Array) -> jax.Array:
        """x float[N, D], rows grouped by expert (`sizes` int32[E] rows each, in expert order) -> float[N, D]."""
        gate_up = grouped_matmul(x.astype(self.dtype), self.gate_up_proj[...].astype(self.dtype), sizes)
        gate, up = jnp.split(gate_up, 2, axis=-1)
        return grouped_matmul(self.act(gate) * up, self.down_proj[...].astype(self.dtype), sizes)


TILE = 128  # megablox's tile side


def grouped_matmul(x: jax.Array, w: jax.Array, sizes: jax.Array) -> jax.Array:
    """Rows of x float[N, K] in consecutive groups of `sizes` int32[G] times their group's w float[G, K, M].

    For a TPU target (the traced mesh's devices, `sharding.target_platform`), with K and M multiples of
    128: Pallas' megablox kernels (`gmm` forward, `tgmm` for the weights' gradient), whose work is the
    rows' only; else `jax.lax.ragged_dot`. XLA:TPU compiles ragged_dot's forward and input gradient as
    grouped matmuls too, but its weight gradient (the contraction over the ragged rows) as a dense
    masked convolution over all G groups: G× the FLOPs (libtpu 0.0.42; docs/models.md)."""
    if sharding.target_platform() == "tpu" and x.shape[1] % TILE == 0 and w.shape[2] % TILE == 0:
        from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

        return megablox.gmm(x, w, sizes, x.dtype, (TILE, TILE, TILE))
    return jax.lax.ragged_dot(x, w, sizes)


class SparseMoE(nnx.Module):
    """Call: `moe(x float[B, T, D]) -> (float[B, T, D], (probs float32[B·T, E], chosen int32[B·T, k]))`."""

    def __init__(self, dim: int, cfg: MoEConfig, act: str, *, param_dtype, dtype, rngs: layers.InitKeys):
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.gate = Linear(dim, cfg.num_experts, ("embed", None), bias=False, **kw)
        self.experts = Experts(cfg.num_experts, dim, cfg.intermediate_size, act, **kw)
        self.top_k, self.num_experts = cfg.top_k, cfg.num_experts

    def __call__(self, x: jax.Array):
        B, T, D = x.shape
        tokens = x.reshape(B * T, D)
        logits = self.gate(tokens)
        probs = jax.nn.softmax(logits.astype(layers.wide(logits.dtype)), axis=-1)
        top, chosen = jax.lax.top_k(probs, self.top_k)
        weights = (top / top.sum(-1, keepdims=True)).astype(logits.dtype)
        flat = chosen.reshape(-1)  # [N·k]: token n's assignments at n·k … n·k + k − 1
        order = jnp.argsort(flat, stable=True)
        sizes = jnp.bincount(flat, length=self.num_experts).astype(jnp.int32)
        token = order // self.top_k
        out = self.experts(tokens[token], sizes) * weights.reshape(-1)[order][:, None]
        y = jnp.zeros_like(out, shape=(B * T, D)).at[token].add(out)
        return shard_activation(y.reshape(B, T, D).astype(x.dtype), ("batch", "seq", "act_embed")), (probs, chosen)


def router_stats(probs: jax.Array, chosen: jax.Array, valid: jax.Array, num_experts: int) -> jax.Array:
    """float[3, E] in the probabilities' dtype (float32, float64 in x64 runs): over the real tokens (`valid`
    bool[N]), per expert its top-k assignments, its summed router probabilities, and (row 2, every entry)
    the number of real tokens — summed over layers and forwards, they give `aux_loss` and the load."""
    w = valid.astype(probs.dtype)
    counts = jnp.zeros(num_experts, probs.dtype).at[chosen.reshape(-1)].add(jnp.repeat(w, chosen.shape[1]))
    return jnp.stack([counts, (probs * w[:, None]).sum(0), jnp.full(num_experts, w.sum())])


def aux_loss(stats: jax.Array) -> jax.Array:
    """transformers' `load_balancing_loss_func` from summed `router_stats`: E · Σ_e (assignments_e / rows)
    · (probability_e / rows), rows = real tokens × sparse layers (assignments per row sum to k)."""
    rows = jnp.maximum(stats[2, 0], 1.0)
    return stats.shape[1] * jnp.sum((stats[0] / rows) * (stats[1] / rows))
