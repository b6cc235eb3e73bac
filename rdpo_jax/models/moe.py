"""Sparse mixture-of-experts feed-forward block (transformers' `Qwen3VLMoeTextSparseMoeBlock`; with a
sigmoid-gated shared expert, `Qwen3_5MoeSparseMoeBlock`).

A linear router scores the E experts per token; softmax in float32, the top k kept and renormalized to
sum to 1. Tokens are dispatched dropless by sorting their k (token, expert) assignments by expert and
running each expert's SwiGLU over its contiguous group as grouped matmuls (`grouped_matmul`: on TPU
Pallas' megablox kernels, whose FLOPs forward and backward are those of the k experts each token uses,
not of all E; elsewhere `jax.lax.ragged_dot`, which XLA:CPU lowers densely, E× the work: fine for the
tests' tiny models). The weighted outputs are summed back per token by a scatter-add.

Experts are stacked weights: `experts.gate_up_proj` float[E, D, 2I] (gate columns first) and
`experts.down_proj` float[E, I, D] — Qwen3-VL-MoE's Hub layout ([E, in, out]); transformers 5 keeps
[E, out, in] in memory (Qwen3.5-MoE's Hub layout), and `models/hf.py` reads either by shape and writes the
family's (`Family.hf_experts`).

The block also returns what the load-balancing loss needs (`router_stats`, `aux_loss`): per expert the
number of top-k assignments and the summed router probabilities over the real tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from rdpo_jax import sharding
from rdpo_jax.models import layers, lora
from rdpo_jax.models.config import MoEConfig
from rdpo_jax.models.layers import Linear
from rdpo_jax.sharding import shard_activation


class Experts(nnx.Module):
    ADAPTABLE = {"gate_up_proj": -2, "down_proj": -2}  # for `lora.attach`: one adapter per expert

    def __init__(self, num: int, dim: int, inter: int, act: str, *, param_dtype, dtype, rngs: layers.InitKeys):
        self.gate_up_proj = layers.param(rngs, layers._normal, (num, dim, 2 * inter), param_dtype,
                                         ("expert", "expert_embed", "expert_mlp"))
        self.down_proj = layers.param(rngs, layers._normal, (num, inter, dim), param_dtype,
                                      ("expert", "expert_mlp", "expert_embed"))
        self.act, self.dtype = layers.activation(act), dtype

    def arrays(self) -> dict[str, jax.Array]:
        """The stacked weights [E, …] in the compute dtype (dequantized if stored quantized) and, where an
        adapter is on, its A and B ("gate_up_proj_a", …): what `run` takes, whole or a device's share."""
        out = {}
        for leaf in self.ADAPTABLE:
            out[leaf] = lora.weight(self, leaf, self.dtype)
            if (adapter := lora.adapters(self, leaf, self.dtype)) is not None:
                out[leaf + "_a"], out[leaf + "_b"] = adapter[:2]
        return out

    def run(self, x: jax.Array, w: dict[str, jax.Array], sizes: jax.Array) -> jax.Array:
        """x float[N, D], rows grouped by expert (`sizes` int32[G] rows each, in expert order), through the
        experts' weights `w` (`arrays`: gate_up float[G, D, 2I], down float[G, I, D], adapters [G, …]) ->
        float[N, D]."""
        def matmul(x, leaf):
            y = grouped_matmul(x, w[leaf], sizes)
            if leaf + "_a" in w:
                y = y + self.lora_scale * grouped_matmul(grouped_matmul(x, w[leaf + "_a"], sizes), w[leaf + "_b"], sizes)
            return y

        gate, up = jnp.split(matmul(x.astype(self.dtype), "gate_up_proj"), 2, axis=-1)
        return matmul(self.act(gate) * up, "down_proj")


# which dimension of each of `Experts.arrays` is split over fsdp (the model width), for the expert-parallel block
_FSDP_DIM = {"gate_up_proj": 1, "down_proj": 2, "gate_up_proj_a": 1, "down_proj_b": 2}


TILE = 128  # megablox's tile side


def grouped_matmul(x: jax.Array, w: jax.Array, sizes: jax.Array) -> jax.Array:
    """Rows of x float[N, K] in consecutive groups of `sizes` int32[G] times their group's w float[G, K, M].

    For a TPU target (the traced mesh's devices, `sharding.target_platform`): Pallas' megablox kernels
    (`gmm` forward, `tgmm` for the weights' gradient), whose work is the rows' only, with K and M
    zero-padded to multiples of 128 (a LoRA adapter's rank 16 costs 8× its few FLOPs, not E×); else
    `jax.lax.ragged_dot`. XLA:TPU compiles ragged_dot's forward and input gradient as
    grouped matmuls too, but its weight gradient (the contraction over the ragged rows) as a dense
    masked convolution over all G groups: G× the FLOPs (libtpu 0.0.42; docs/models.md)."""
    if sharding.target_platform() == "tpu":
        from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

        K, M = w.shape[1:]
        if K % TILE or M % TILE:  # e.g. an adapter's rank: zero-padded to the kernels' tile, which adds nothing
            x = jnp.pad(x, ((0, 0), (0, -K % TILE)))
            w = jnp.pad(w, ((0, 0), (0, -K % TILE), (0, -M % TILE)))
        return megablox.gmm(x, w, sizes, x.dtype, (TILE, TILE, TILE))[:, :M]
    return jax.lax.ragged_dot(x, w, sizes)


class SparseMoE(nnx.Module):
    """Call: `moe(x float[B, T, D]) -> (float[B, T, D], (probs float32[B·T, E], chosen int32[B·T, k]))`; with
    `MoEConfig.shared_intermediate_size`, plus sigmoid(shared_expert_gate(x)) · shared_expert(x)."""

    def __init__(self, dim: int, cfg: MoEConfig, act: str, *, param_dtype, dtype, rngs: layers.InitKeys):
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.gate = Linear(dim, cfg.num_experts, ("embed", None), bias=False, **kw)
        self.experts = Experts(cfg.num_experts, dim, cfg.intermediate_size, act, **kw)
        if cfg.shared_intermediate_size:
            self.shared_expert = layers.MLP(dim, cfg.shared_intermediate_size, act, bias=False, **kw)
            self.shared_expert_gate = Linear(dim, 1, ("embed", None), bias=False, **kw)
        self.top_k, self.num_experts = cfg.top_k, cfg.num_experts

    def __call__(self, x: jax.Array):
        B, T, D = x.shape
        tokens = x.reshape(B * T, D)
        logits = self.gate(tokens)
        probs = jax.nn.softmax(logits.astype(layers.wide(logits.dtype)), axis=-1)
        _, chosen = jax.lax.top_k(jax.lax.stop_gradient(probs), self.top_k)
        # the chosen probabilities by a one-hot product, whose gradient is dense: top_k's and a gather's are
        # scatter-adds of scalars, which XLA:TPU's cost model prices at -2 s each
        top = (jax.nn.one_hot(chosen, self.num_experts, dtype=probs.dtype) * probs[:, None, :]).sum(-1)
        weights = (top / top.sum(-1, keepdims=True)).astype(logits.dtype)
        if sharding.axis_size("expert") > 1:
            y = self._expert_parallel(x, chosen.reshape(B, T, -1), weights.reshape(B, T, -1))
        else:
            y = _dispatch(tokens, chosen, weights, self.experts.arrays(), self.experts).reshape(B, T, D)
        if getattr(self, "shared_expert", None) is not None:
            y = y + jax.nn.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return shard_activation(y.astype(x.dtype), ("batch", "seq", "act_embed")), (probs, chosen)

    def _expert_parallel(self, x, chosen, weights):
        """The block over the mesh's "expert" axis (`jax.shard_map`, every axis manual): each device routes
        its own rows' tokens; an all-to-all sends each (token, expert) assignment to the device holding
        that expert, which runs its experts (their FSDP shards all-gathered) over what it received, and a
        second all-to-all brings the outputs back. Dropless: a device reserves room for all of its
        assignments going to any one device (n·k rows per destination), so nothing is ever cut."""
        batch = PartitionSpec(sharding.BATCH_AXES)
        experts = self.experts

        # a quantized base arrives gathered already (`lora.weight` gathers its codes)
        fsdp_dim = {k: d for k, d in _FSDP_DIM.items() if getattr(experts, k + "_codes", None) is None}

        def local(x, chosen, weights, w):
            ep, n = jax.lax.axis_size("expert"), x.shape[0] * x.shape[1]
            # this device's experts [E/ep, …], their model width all-gathered
            w = {k: jax.lax.all_gather(v, "fsdp", axis=fsdp_dim[k], tiled=True) if k in fsdp_dim else v
                 for k, v in w.items()}
            per_device = w["gate_up_proj"].shape[0]
            flat = chosen.reshape(-1)  # [n·k]
            dest, local_expert = flat // per_device, flat % per_device
            slot = (jnp.cumsum(jax.nn.one_hot(dest, ep, dtype=jnp.int32), axis=0)[jnp.arange(flat.size), dest] - 1)
            tokens = x.reshape(n, -1)[jnp.arange(flat.size) // self.top_k]
            capacity = flat.size
            send = jnp.zeros((ep, capacity, x.shape[-1]), x.dtype).at[dest, slot].set(tokens)
            ids = jnp.full((ep, capacity), per_device, jnp.int32).at[dest, slot].set(local_expert)
            got = jax.lax.all_to_all(send, "expert", 0, 0, tiled=True).reshape(ep * capacity, -1)
            got_ids = jax.lax.all_to_all(ids, "expert", 0, 0, tiled=True).reshape(-1)  # per_device: an empty slot
            out = _dispatch(got, got_ids[:, None], jnp.ones((got_ids.size, 1), x.dtype), w, experts, groups=per_device)
            back = jax.lax.all_to_all(out.reshape(ep, capacity, -1), "expert", 0, 0, tiled=True)
            y = back[dest, slot] * weights.reshape(-1, 1)
            return y.reshape(*chosen.shape, -1).sum(axis=-2)

        w = experts.arrays()
        w_specs = {k: PartitionSpec("expert", *("fsdp" if d == fsdp_dim.get(k) else None for d in (1, 2)))
                   for k in w}
        # check_vma off: Pallas' megablox kernels (a TPU target) declare outputs without varying-axes types
        return jax.shard_map(local, in_specs=(batch, batch, batch, w_specs), out_specs=batch, check_vma=False)(
            x, chosen, weights, w)


def _dispatch(tokens, chosen, weights, w: dict[str, jax.Array], experts: Experts, groups: int | None = None):
    """Σ_j weights[n, j] · expert chosen[n, j](tokens[n]) for tokens float[N, D], chosen int32[N, k]:
    assignments sorted by expert into contiguous groups for the grouped matmuls. Ids ≥ `groups` (default
    the number of experts) are empty slots: sorted last, outside every group, they give 0."""
    groups = w["gate_up_proj"].shape[0] if groups is None else groups
    k = chosen.shape[1]
    flat = chosen.reshape(-1)  # [N·k]: token n's assignments at n·k … n·k + k − 1
    order = jnp.argsort(flat, stable=True)
    sizes = jax.nn.one_hot(flat, groups, dtype=jnp.int32).sum(0)  # ids ≥ groups: all-zero rows
    token = order // k
    rows = experts.run(tokens[token], w, sizes)
    rows = jnp.where((jnp.arange(flat.size) < sizes.sum())[:, None], rows, 0) * weights.reshape(-1)[order][:, None]
    return jnp.zeros_like(rows, shape=tokens.shape).at[token].add(rows)


def router_stats(probs: jax.Array, chosen: jax.Array, valid: jax.Array, num_experts: int) -> jax.Array:
    """float[3, E] in the probabilities' dtype (float32, float64 in x64 runs): over the real tokens (`valid`
    bool[N]), per expert its top-k assignments, its summed router probabilities, and (row 2, every entry)
    the number of real tokens — summed over layers and forwards, they give `aux_loss` and the load."""
    w = valid.astype(probs.dtype)
    counts = (jax.nn.one_hot(chosen, num_experts, dtype=probs.dtype) * w[:, None, None]).sum((0, 1))
    return jnp.stack([counts, (probs * w[:, None]).sum(0), jnp.full(num_experts, w.sum())])


def aux_loss(stats: jax.Array) -> jax.Array:
    """transformers' `load_balancing_loss_func` from summed `router_stats`: E · Σ_e (assignments_e / rows)
    · (probability_e / rows), rows = real tokens × sparse layers (assignments per row sum to k)."""
    rows = jnp.maximum(stats[2, 0], 1.0)
    return stats.shape[1] * jnp.sum((stats[0] / rows) * (stats[1] / rows))
