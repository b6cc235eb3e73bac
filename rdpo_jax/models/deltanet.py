"""Gated DeltaNet (transformers' `Qwen3_5GatedDeltaNet`): the linear-attention mixer of Qwen3.5's hybrid
decoder, and how a packed row's branches run through its recurrent state.

Per value head the state S float32[Dk, Dv] follows the gated delta rule

    S_t = e^{g_t} (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ,    o_t = S_tᵀ q_t

after a causal depthwise convolution (kernel K, silu) over the raw q|k|v projections u. A token's state
and convolution window are those of its *lineage*: the tokens it attends to in the decoder's mask. In a
plain row that is every earlier token; in a shared-prefix row `[prompt][chosen][rejected]` the rejected
answer's lineage is the prompt and itself, so it starts from the state the prompt ended in and from the
prompt's last K − 1 inputs, as a separate forward `[prompt][rejected]` would — never from the chosen
answer's. Segments packed in one row (`groups_per_row`) start from zero. Nothing but the mask says so:
`lineage` reads it once per forward, and every layer uses the result.

Convolution: y_t = silu(Σ_i w[K−1−i] · u[prev^i(t)]) with prev(t) the latest token of t's lineage before
it (−1: none, u = 0 there): K − 1 gathers instead of a shift.

Recurrence (the chunked form for training and prefill, chunks of C = 64 tokens, float32): within a chunk,
token i's lineage is a set of tokens j ≤ i (the mask's diagonal block), decays accumulate along it
(γ_i = Σ_{j ∈ lineage(i) ∩ chunk} g_j), and transformers' UT transform is solved with that block as its
sparsity (the lineage is transitive, so the triangular inverse keeps it). What a token reads from before
its chunk — its *entry* state — is one of three: zero (its lineage starts inside the chunk), the state
after the previous chunk's last token (the carry: it continues that token's lineage), or the state after
the latest branch point (a token that a later token continues from out of order: a prompt's last token),
which the scan keeps in a second slot. Every layout the packer writes has answers right after their prompt
and segments one after another, so a branch always starts from the latest branch point: one saved slot
serves `[P₁][a][b][P₂][c][d]…`. Each chunk costs two state reads instead of one; nothing is gathered or
padded per segment.

Kept in float32 whatever the compute dtype: `A_log` and `dt_bias` (g = −e^{A_log}·softplus(a + dt_bias)
amplifies their rounding; the Hub stores them in float32), the output norm's weight (also float32 on the
Hub), the kernel's q, k, v, β, g and the state (a bfloat16 state drifts over thousands of tokens).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rdpo_jax.models import layers
from rdpo_jax.models.config import DeltaNetConfig
from rdpo_jax.models.layers import Linear

CHUNK = 64
HIGHEST = jax.lax.Precision.HIGHEST  # float32 matmuls in float32 on TPU too (its default is one bfloat16 pass)
ZERO, CARRY, SAVED = 0, 1, 2  # a token's entry state


class Lineage(NamedTuple):
    """The rows' layout as every DeltaNet layer of one forward needs it (`lineage`), T padded in front to
    Tp = n·C (the padding is no token's lineage)."""
    taps: jax.Array  # int32[B, K−1, T]: prev^i(t), i = 1 … K−1 (−1: none)
    valid: jax.Array  # bool[B, T]: a token (the mask's diagonal)
    within: jax.Array  # bool[B, n, C, C]: [c, i, j] — token j of chunk c is in the lineage of its token i
    entry: jax.Array  # int32[B, n, C]: ZERO, CARRY or SAVED
    save: jax.Array  # int32[B, n]: the chunk's last branch point (index in the chunk), −1 none


def lineage(mask: jax.Array, kernel: int, chunk: int | None = None) -> Lineage:
    """The `Lineage` of rows from the decoder's mask bool[B, T, S ≥ T] (its first T keys are the rows'
    tokens; True = may attend), `kernel` the convolution's K, chunks of `chunk` tokens (default `CHUNK`)."""
    B, T = mask.shape[:2]
    chunk = chunk or CHUNK
    idx = jnp.arange(T, dtype=jnp.int32)
    m = mask[:, :, :T] & (idx[None, :, None] >= idx[None, None, :])
    valid = jnp.diagonal(m, axis1=1, axis2=2)
    m = m & valid[:, :, None] & valid[:, None, :]
    prev = jnp.max(jnp.where(m & (idx[None, None, :] < idx[None, :, None]), idx, -1), axis=-1)
    taps = [prev]
    for _ in range(kernel - 2):
        taps.append(jnp.where(taps[-1] >= 0, jnp.take_along_axis(prev, jnp.maximum(taps[-1], 0), axis=1), -1))
    pad = (-T) % chunk
    n = (T + pad) // chunk
    mp = jnp.pad(m, ((0, 0), (pad, 0), (pad, 0)))
    prevp = jnp.pad(jnp.where(prev >= 0, prev + pad, -1), ((0, 0), (pad, 0)), constant_values=-1)
    validp = jnp.pad(valid, ((0, 0), (pad, 0)))
    blocks = mp.reshape(B, n, chunk, n, chunk)
    within = jnp.moveaxis(blocks[:, np.arange(n), :, np.arange(n), :], 0, 1)  # [B, n, C, C]
    pos = jnp.arange(T + pad, dtype=jnp.int32)
    start = pos // chunk * chunk  # each token's chunk start
    last = jnp.max(jnp.where(mp & (pos[None, None, :] < start[None, :, None]), pos, -1), axis=-1)
    entry = jnp.where(last < 0, ZERO, jnp.where(last == start - 1, CARRY, SAVED))
    # branch points: continued by a later token out of order
    branch = jnp.any((prevp[:, :, None] == pos[None, None, :]) & (pos[None, :, None] != pos[None, None, :] + 1)
                     & validp[:, :, None], axis=1)
    local = jnp.where(branch, pos % chunk, -1).reshape(B, n, chunk)
    return Lineage(jnp.stack(taps, axis=1), valid, within, entry.reshape(B, n, chunk), local.max(-1))


def conv(u: jax.Array, taps: jax.Array, w: jax.Array) -> jax.Array:
    """silu of the causal depthwise convolution along each token's lineage: u float[B, T, C], taps
    int32[B, K−1, T] (`Lineage.taps`), w float[C, 1, K] (PyTorch's layout; w[..., K−1] weighs the newest)."""
    K = w.shape[-1]
    y = u * w[:, 0, K - 1]
    for i in range(1, K):
        tap = taps[:, i - 1]
        back = jnp.take_along_axis(u, jnp.maximum(tap, 0)[..., None], axis=1)
        y = y + jnp.where((tap >= 0)[..., None], back, 0) * w[:, 0, K - 1 - i]
    return jax.nn.silu(y)


def _einsum(spec, *xs):
    return jnp.einsum(spec, *xs, precision=HIGHEST)


def chunked_rule(q, k, v, beta, g, lin: Lineage) -> tuple[jax.Array, jax.Array]:
    """The gated delta rule over rows laid out as `lin` says, chunk by chunk.

    q, k float32[B, T, H, Dk] (l2-normalized, q scaled by Dk^−½), v float32[B, T, H, Dv], beta, g
    float32[B, T, H]. Returns (o float32[B, T, H, Dv], the state float32[B, H, Dk, Dv] after token T − 1).
    """
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    n, C = lin.within.shape[1:3]
    pad = n * C - T
    live = lin.valid[..., None].astype(q.dtype)  # padding tokens become exact no-ops
    q, k, v = q * live[..., None], k * live[..., None], v * live[..., None]
    beta, g = beta * live, g * live

    def chunks(x):  # [B, T, H, …] -> [B, n, H, C, …]
        x = jnp.pad(x, ((0, 0), (pad, 0)) + ((0, 0),) * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(B, n, C, *x.shape[2:]), 3, 2)

    q, k, v, beta, g = map(chunks, (q, k, v, beta, g))  # q [B, n, H, C, Dk]; beta, g [B, n, H, C]
    within = lin.within[:, :, None]  # [B, n, 1, C, C]
    gamma = _einsum("bncj,bnhj->bnhc", within[:, :, 0].astype(g.dtype), g)  # decay along each lineage
    decay = jnp.where(within, jnp.exp(jnp.where(within, gamma[..., :, None] - gamma[..., None, :], 0)), 0)
    strict = within & (np.arange(C)[:, None] > np.arange(C)[None, :])
    a = jnp.where(strict, _einsum("bnhid,bnhjd->bnhij", k, k) * decay * beta[..., None], 0)
    system = a + jnp.eye(C, dtype=a.dtype)
    u = jax.lax.linalg.triangular_solve(system, v * beta[..., None], left_side=True, lower=True, unit_diagonal=True)
    w = jax.lax.linalg.triangular_solve(system, k * (beta * jnp.exp(gamma))[..., None], left_side=True, lower=True,
                                        unit_diagonal=True)
    qk = _einsum("bnhid,bnhjd->bnhij", q, k) * decay  # decay is 0 off the lineage
    qe = q * jnp.exp(gamma)[..., None]
    # A token reads the carried state, the saved one or neither (zero) from before its chunk: W and Q·e^γ
    # with that choice folded in, against the two states stacked along Dk, make one matmul each per chunk.
    reads = jnp.stack([lin.entry == CARRY, lin.entry == SAVED], axis=-1).astype(q.dtype)  # [B, n, C, 2]

    def fold(x):  # [B, n, H, C, Dk] -> [B, n, H, C, 2·Dk]
        return (reads[:, :, None, :, :, None] * x[..., None, :]).reshape(*x.shape[:-1], 2 * Dk)

    w, qe = fold(w), fold(qe)
    # The states the scan keeps are those after two tokens of each chunk, its last and its last branch point
    # (the saved slot's next value, if the chunk has one): their decay rows, cumulative decays and reads,
    # picked by one-hot products (a gather's gradient would be scatter-adds in the backward loop).
    ends = jnp.stack([jax.nn.one_hot(jnp.full_like(lin.save, C - 1), C, dtype=q.dtype),
                      jax.nn.one_hot(lin.save, C, dtype=q.dtype)], axis=2)  # [B, n, 2, C]; save −1: zeros
    end_rows = _einsum("bntc,bnhcj->bnhtj", ends, decay)  # [B, n, H, 2, C]
    end_decay = jnp.exp(_einsum("bntc,bnhc->bnht", ends, gamma))  # [B, n, H, 2]
    end_reads = _einsum("bntc,bncs->bnts", ends, reads)  # [B, n, 2, 2]

    def step(carry, xs):
        s_carry, s_saved = carry  # [B, H, Dk, Dv]
        u, w, qk, qe, k, rows, decays, end_reads, save = xs
        both = jnp.concatenate([s_carry, s_saved], axis=-2)  # [B, H, 2·Dk, Dv]
        v_new = u - _einsum("bhcd,bhde->bhce", w, both)
        o = _einsum("bhcd,bhde->bhce", qe, both) + _einsum("bhij,bhje->bhie", qk, v_new)
        start = _einsum("bts,bhsde->bhtde", end_reads, both.reshape(B, H, 2, Dk, Dv)) * decays[..., None, None]
        states = start + _einsum("bhtjd,bhje->bhtde", rows[..., None] * k[:, :, None], v_new)  # [B, H, 2, Dk, Dv]
        s_saved = jnp.where((save >= 0)[:, None, None, None], states[:, :, 1], s_saved)
        return (states[:, :, 0], s_saved), o

    zeros = jnp.zeros((B, H, Dk, Dv), q.dtype)
    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (u, w, qk, qe, k, end_rows, end_decay, end_reads, lin.save))
    (state, _), o = jax.lax.scan(step, (zeros, zeros), xs)  # o [n, B, H, C, Dv]
    o = jnp.moveaxis(o, 0, 1).swapaxes(2, 3).reshape(B, n * C, H, Dv)
    return o[:, pad:], state


def recurrent_step(q, k, v, beta, g, state) -> tuple[jax.Array, jax.Array]:
    """One token per row: q, k float32[B, H, Dk], v [B, H, Dv], beta, g [B, H], state float32[B, H, Dk, Dv]
    -> (o float32[B, H, Dv], the next state)."""
    state = state * jnp.exp(g)[..., None, None]
    delta = (v - _einsum("bhde,bhd->bhe", state, k)) * beta[..., None]
    state = state + k[..., :, None] * delta[..., None, :]
    return _einsum("bhde,bhd->bhe", state, q), state


def l2norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x · rsqrt(Σx² + eps) over the last axis (transformers' and FLA's: the eps inside the root)."""
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


class GatedRMSNorm(nnx.Module):
    """w · rms(x) · silu(z) per head (transformers' `Qwen3_5RMSNormGated`): normalized in float32, cast
    back, scaled by the float32 weight, gated in float32."""

    def __init__(self, dim: int, eps: float, *, rngs: layers.InitKeys):
        self.scale = layers.param(rngs, lambda key, s, d: jnp.ones(s, d), (dim,), jnp.float32, ("norm",),
                                  keep_dtype=True)
        self.eps = eps

    def __call__(self, x: jax.Array, z: jax.Array) -> jax.Array:
        x32 = x.astype(layers.wide(x.dtype))
        y = (x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)).astype(x.dtype)
        return (self.scale[...] * y * jax.nn.silu(z.astype(layers.wide(z.dtype)))).astype(x.dtype)


class Conv1d(nnx.Module):
    """A depthwise causal convolution's weight float[C, 1, K], PyTorch's `nn.Conv1d` layout and name."""

    def __init__(self, channels: int, kernel: int, *, param_dtype, rngs: layers.InitKeys):
        bound = kernel ** -0.5
        self.weight = layers.param(rngs, lambda key, s, d: jax.random.uniform(key, s, d, -bound, bound),
                                   (channels, 1, kernel), param_dtype, ("mlp", None, None))


class GatedDeltaNet(nnx.Module):
    """Call: `mixer(x float[B, T, D], lin)` -> float[B, T, D] (training, prefill: `lin` from `lineage`); with
    `cache` = (conv tail float[B, K−1, C], state float32[B, H, Dk, Dv]) it also returns the cache after the
    rows' last token, and T = 1 is one decode step from it (`lin` unused)."""

    def __init__(self, hidden: int, cfg: DeltaNetConfig, eps: float, *, param_dtype, dtype, rngs: layers.InitKeys):
        kw = dict(bias=False, param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        kd, vd = cfg.key_heads * cfg.key_dim, cfg.value_heads * cfg.value_dim
        self.in_proj_qkv = Linear(hidden, 2 * kd + vd, ("embed", "mlp"), **kw)
        self.in_proj_z = Linear(hidden, vd, ("embed", "mlp"), **kw)
        self.in_proj_b = Linear(hidden, cfg.value_heads, ("embed", None), **kw)
        self.in_proj_a = Linear(hidden, cfg.value_heads, ("embed", None), **kw)
        self.conv1d = Conv1d(2 * kd + vd, cfg.conv_kernel, param_dtype=param_dtype, rngs=rngs)
        self.dt_bias = layers.param(rngs, lambda key, s, d: jnp.ones(s, d), (cfg.value_heads,), jnp.float32, (None,),
                                    keep_dtype=True)
        self.A_log = layers.param(rngs, lambda key, s, d: jnp.log(jax.random.uniform(key, s, d, 0.01, 16)),
                                  (cfg.value_heads,), jnp.float32, (None,), keep_dtype=True)
        self.norm = GatedRMSNorm(cfg.value_dim, eps, rngs=rngs)
        self.out_proj = Linear(vd, hidden, ("mlp", "embed"), **kw)
        self.cfg, self.dtype = cfg, dtype

    def __call__(self, x: jax.Array, lin: Lineage | None, cache=None):
        cfg = self.cfg
        B, T, _ = x.shape
        kd = cfg.key_heads * cfg.key_dim
        u = self.in_proj_qkv(x)
        w = self.conv1d.weight[...].astype(self.dtype)
        if cache is not None and T == 1:
            tail, state = cache
            window = jnp.concatenate([tail.astype(u.dtype), u], axis=1)  # [B, K, C], oldest first
            mixed = jax.nn.silu(jnp.einsum("bkc,ck->bc", window, w[:, 0]))[:, None]
            new_tail = window[:, 1:]
        else:
            mixed = conv(u, lin.taps, w)
        f32 = layers.wide(self.dtype)  # float32 (float64 in x64 runs)
        q, k, v = jnp.split(mixed.astype(f32), [kd, 2 * kd], axis=-1)
        r = cfg.value_heads // cfg.key_heads
        q = jnp.repeat(l2norm(q.reshape(B, T, cfg.key_heads, cfg.key_dim)), r, axis=2) * cfg.key_dim ** -0.5
        k = jnp.repeat(l2norm(k.reshape(B, T, cfg.key_heads, cfg.key_dim)), r, axis=2)
        v = v.reshape(B, T, cfg.value_heads, cfg.value_dim)
        beta = jax.nn.sigmoid(self.in_proj_b(x)).astype(f32)
        g = -jnp.exp(self.A_log[...].astype(f32)) * jax.nn.softplus(self.in_proj_a(x).astype(f32)
                                                                    + self.dt_bias[...].astype(f32))
        if cache is not None and T == 1:
            o, state = recurrent_step(q[:, 0], k[:, 0], v[:, 0], beta[:, 0], g[:, 0], state.astype(f32))
            o, new_cache = o[:, None], (new_tail, state)
        else:
            o, state = chunked_rule(q, k, v, beta, g, lin)
            new_cache = None
            if cache is not None:  # the last token's window: its K − 1 lineage inputs, oldest first
                last = [jnp.full((B,), T - 1, jnp.int32)] + [lin.taps[:, i, T - 1] for i in range(cfg.conv_kernel - 2)]
                tail = jnp.stack([jnp.where((t >= 0)[:, None], u[jnp.arange(B), jnp.maximum(t, 0)], 0)
                                  for t in reversed(last)], axis=1)
                new_cache = (tail.astype(cache[0].dtype), state)
        z = self.in_proj_z(x).reshape(B, T, cfg.value_heads, cfg.value_dim)
        out = self.out_proj(self.norm(o.astype(self.dtype), z).reshape(B, T, -1))
        return out if cache is None else (out, new_cache)

    def init_cache(self, batch: int, dtype) -> tuple[jax.Array, jax.Array]:
        """An empty cache: conv tail float[batch, K−1, C] in `dtype`, state float32[batch, H, Dk, Dv]."""
        cfg = self.cfg
        channels = 2 * cfg.key_heads * cfg.key_dim + cfg.value_heads * cfg.value_dim
        return (jnp.zeros((batch, cfg.conv_kernel - 1, channels), dtype),
                jnp.zeros((batch, cfg.value_heads, cfg.key_dim, cfg.value_dim), layers.wide(dtype)))
