"""Building blocks shared by the vision tower and the text decoder.

Einsum letters: B batch, T query length, S key length, N query heads, K key/value heads,
G query heads per key/value head (N = K·G), H head dim, D model width.

Parameters are stored in `param_dtype` and cast to the compute `dtype` where used; norms, softmax and
RoPE angles are computed in float32. Leaf names follow what they hold (`kernel` [in, out], `scale`,
`bias`, `embedding`) and `models/hf.py` maps them to transformers' names.
"""

from __future__ import annotations

import functools

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rdpo_jax import sharding
from rdpo_jax.models import lora, splash
from rdpo_jax.sharding import shard_activation

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class InitKeys:
    """Parameter-init keys: the i-th call of `params()` returns fold_in(key, i).

    Duck-types the `params()` stream of `nnx.Rngs` (modules accept either) without its RNG-state
    variables, which make tracing a model's init (`nnx.eval_shape`, jitted `create`) ~5x slower.
    """

    def __init__(self, key: jax.Array):
        self.key, self.count = key, 0

    def params(self) -> jax.Array:
        self.count += 1
        return jax.random.fold_in(self.key, self.count)


def wide(dtype):
    """The dtype for numerically sensitive parts (norms, softmax, logits): float32, or float64 in x64 runs."""
    return jnp.promote_types(dtype, jnp.float32)


def param(rngs: nnx.Rngs | InitKeys, init, shape, dtype, axes: Sequence[str | None],
          units: Sequence[int] | None = None, keep_dtype: bool = False) -> nnx.Param:
    """A parameter with logical axis names (see `rdpo_jax.sharding.RULES`); `units` = per dimension the
    size of the pieces it may be sharded into (head_dim for a flattened heads × head_dim dimension);
    `keep_dtype`: `dtype` whatever the run's param_dtype, on disk too (`hf.save_hf`)."""
    assert len(axes) == len(shape) and (units is None or len(units) == len(shape)), (axes, units, shape)
    extra = {} if units is None else {"shard_units": tuple(units)}
    if keep_dtype:
        extra["keep_dtype"] = True
    return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=tuple(axes), **extra)


def _normal(key, shape, dtype):
    return 0.02 * jax.random.normal(key, shape, dtype)


def _zeros(key, shape, dtype):
    return jnp.zeros(shape, dtype)


def _ones(key, shape, dtype):
    return jnp.ones(shape, dtype)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel float[in, out]. `units` as in `param` (for the kernel). The kernel may
    carry a low-rank adapter and be stored quantized (`models/lora.py`)."""

    ADAPTABLE = {"kernel": -2}  # for `lora.attach`: the weight leaves and their input dimension

    def __init__(self, din: int, dout: int, axes: tuple[str | None, str | None], *, bias: bool,
                 param_dtype, dtype, rngs: InitKeys, units: tuple[int, int] | None = None):
        self.kernel = param(rngs, _normal, (din, dout), param_dtype, axes, units)
        self.bias = param(rngs, _zeros, (dout,), param_dtype, axes[1:], units and units[1:]) if bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        y = jnp.dot(x, lora.weight(self, "kernel", self.dtype))
        if (adapter := lora.adapters(self, "kernel", self.dtype)) is not None:
            a, b, scale = adapter
            y = y + scale * jnp.dot(jnp.dot(lora.dropout(x, self), a), b)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class FusedLinear(nnx.Module):
    """k projections in one: y[..., i, :] = x @ kernel[:, i, :] (+ bias[i]); kernel float[in, k, out] (PyTorch
    keeps it as one [k·out, in] Linear, e.g. a fused qkv), so that the output dimension shards by itself."""

    ADAPTABLE = {"kernel": -3}

    def __init__(self, din: int, k: int, dout: int, axes: tuple[str | None, str | None], *, bias: bool,
                 param_dtype, dtype, rngs: InitKeys, units: tuple[int, int] | None = None):
        u = units and (units[0], 1, units[1])
        self.kernel = param(rngs, _normal, (din, k, dout), param_dtype, (axes[0], None, axes[1]), u)
        self.bias = param(rngs, _zeros, (k, dout), param_dtype, (None, axes[1]), u and u[1:]) if bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        y = jnp.einsum("...d,dkf->...kf", x, lora.weight(self, "kernel", self.dtype))
        if (adapter := lora.adapters(self, "kernel", self.dtype)) is not None:
            a, b, scale = adapter
            y = y + scale * jnp.einsum("...r,rkf->...kf", jnp.dot(lora.dropout(x, self), a), b)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    """Token embedding float[V, D]; `attend` computes tied output logits."""

    def __init__(self, num: int, dim: int, axes: tuple[str, str], *, param_dtype, dtype, rngs: InitKeys):
        self.embedding = param(rngs, _normal, (num, dim), param_dtype, axes)
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        table = _gathered(self.embedding[...], self.embedding.get_metadata().get("logical_axes"))
        return jnp.take(table, ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        return jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _gathered(table: jax.Array, axes) -> jax.Array:
    """The embedding table with its width all-gathered (as FSDP does for every weight it uses): a lookup
    into a width-sharded table yields width-sharded activations, which would then need a full reshuffle.
    Its gradient (the lookup's scatter-add, summed over the batch's devices) is asked for in the table's
    own width shards (`axes`, its logical axes): a plain constraint's transpose would ask for it whole,
    which XLA then all-reduces in float32 before slicing the shard (the whole table's bytes, 2 GiB per chip
    and step for Qwen2.5-VL-7B on v5p-64, instead of an all-to-all of the rows' 64 MiB)."""
    return shard_activation(table, ("vocab", None))


def _gathered_fwd(table, axes):
    return _gathered(table, axes), None


def _gathered_bwd(axes, _, g):
    # Only where the batch's devices are the FSDP devices ("data" and "expert" of size 1): their rows then
    # move in one all-to-all. Across data replicas XLA finds no cheap path from batch rows to table shards
    # and would gather the rows whole (it says so: "involuntary full rematerialization"), so there the
    # gradient stays as the forward constraint's transpose makes it. Tensor-parallel devices hold the same
    # rows: the vocabulary stays whole.
    if axes is None or jax.sharding.get_abstract_mesh().empty or sharding.axis_size("data") != 1 \
            or sharding.axis_size("expert") != 1:
        return (shard_activation(g, ("vocab", None)),)  # the forward constraint's own transpose
    return (shard_activation(g, tuple(None if a == "vocab" else a for a in axes)),)


_gathered.defvjp(_gathered_fwd, _gathered_bwd)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, param_dtype, dtype, rngs: InitKeys):
        self.scale = param(rngs, _ones, (dim,), param_dtype, ("norm",))
        self.bias = param(rngs, _zeros, (dim,), param_dtype, ("norm",))
        self.eps, self.dtype = eps, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(wide(x.dtype))
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(x.dtype) + self.bias[...].astype(x.dtype)
        return y.astype(self.dtype)


class RMSNorm(nnx.Module):
    """Llama/Qwen RMSNorm: normalize in float32, cast, then scale (transformers' order of operations).
    `zero_centred` (Qwen3.5's `Qwen3_5RMSNorm`): the weight starts at 0 and scales by (1 + w), in float32
    before the cast."""

    def __init__(self, dim: int, eps: float, *, param_dtype, dtype, rngs: InitKeys, axes=("norm",),
                 zero_centred: bool = False):
        self.scale = param(rngs, _zeros if zero_centred else _ones, (dim,), param_dtype, axes)
        self.eps, self.dtype, self.zero_centred = eps, dtype, zero_centred

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(wide(x.dtype))
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
        if self.zero_centred:
            return (y * (1 + self.scale[...].astype(y.dtype))).astype(self.dtype)
        return self.scale[...].astype(self.dtype) * y.astype(self.dtype)


class MLP(nnx.Module):
    """SwiGLU: down(act(gate(x)) · up(x))."""

    def __init__(self, dim: int, width: int, act: str, *, bias: bool, param_dtype, dtype, rngs: InitKeys):
        kw = dict(bias=bias, param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.gate_proj = Linear(dim, width, ("embed", "mlp"), **kw)
        self.up_proj = Linear(dim, width, ("embed", "mlp"), **kw)
        self.down_proj = Linear(width, dim, ("mlp", "embed"), **kw)
        self.act = activation(act)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.act(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(shard_activation(h, ("batch", "seq", "act_mlp")))


# ----- LM head -----

def target_logps(x: jax.Array, w: jax.Array, targets: jax.Array, chunk: int) -> jax.Array:
    """log softmax(x @ w)[target] float32[...] without all [..., V] logits alive at once.

    Args:
      x: final hidden states float[..., D]; w: the head float[D, V]; targets: int[...] in [0, V).
      chunk: most vocabulary columns per chunk; 0 or ≥ V computes the logits whole.

    The head is viewed (no copy) as [D, a, n, b]: a = 8 blocks (the vocabulary's split over up to 8 tensor
    devices) of n chunks of b columns, chunk i taking b columns from every block, so that a vocabulary
    sharded in blocks shards every chunk alike, and n dividing V/a when such an n near V/(a·chunk) exists
    (else w is padded once). The forward pass keeps a running logsumexp and the target's logit in float32;
    the backward pass recomputes each chunk's logits and writes that chunk's gradient columns in place.
    Logits are rounded to x's dtype before float32, as a head computed whole is; x and w should share the
    compute dtype.
    """
    V = w.shape[1]
    if chunk <= 0 or V <= chunk:
        logits = jnp.dot(x, w).astype(wide(x.dtype))
        picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return picked - jax.nn.logsumexp(logits, axis=-1)
    return _chunked_logps(x, w, targets, _chunk_view(V, chunk))


def _chunk_view(V: int, chunk: int) -> tuple[int, int, int]:
    """(a, n, b) with a·n·b ≥ V (= V when n divides V/a), a·b ≤ chunk columns per chunk."""
    a = 8 if V % 8 == 0 and chunk >= 8 else 1
    least = -(-V // chunk)
    n = next((n for n in range(least, 2 * least + 1) if (V // a) % n == 0), least)
    return a, n, -(-V // (a * n))


def _view(w, view):
    a, n, b = view
    D, V = w.shape
    return jnp.pad(w, ((0, 0), (0, a * n * b - V))).reshape(D, a, n, b)  # no pad when a·n·b = V


def _chunk_logits(x, w4, i, V):
    """Logits float32[..., a·b] of chunk i of the head viewed as w4 [D, a, n, b]; −inf past V."""
    D, a, n, b = w4.shape
    wi = jax.lax.dynamic_index_in_dim(w4, i, axis=2, keepdims=False).reshape(D, a * b)
    logits = jnp.dot(x, wi).astype(wide(x.dtype))
    ids = (jnp.arange(a)[:, None] * (n * b) + i * b + jnp.arange(b)).reshape(-1)
    return jnp.where(ids < V, logits, -jnp.inf), wi


def _target_slot(targets, view):
    """(chunk, column within the chunk) of each target id."""
    a, n, b = view
    block, rest = targets // (n * b), targets % (n * b)
    return rest // b, block * b + rest % b


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked_logps(x, w, targets, view):
    return _chunked_fwd(x, w, targets, view)[0]


def _chunked_fwd(x, w, targets, view):
    V, w4 = w.shape[1], _view(w, view)
    chunk_of, column = _target_slot(targets, view)

    def step(carry, i):
        lse, picked = carry
        logits, _ = _chunk_logits(x, w4, i, V)
        lse = jnp.logaddexp(lse, jax.nn.logsumexp(logits, axis=-1))
        value = jnp.take_along_axis(logits, column[..., None], axis=-1)[..., 0]
        return (lse, picked + jnp.where(chunk_of == i, value, 0.0)), None

    f32 = wide(x.dtype)
    start = (jnp.full(targets.shape, -jnp.inf, f32), jnp.zeros(targets.shape, f32))
    (lse, picked), _ = jax.lax.scan(step, start, jnp.arange(view[1]))
    return picked - lse, (x, w, targets, lse)


def _chunked_bwd(view, res, g):
    x, w, targets, lse = res
    V, w4 = w.shape[1], _view(w, view)
    D, a, n, b = w4.shape
    chunk_of, column = _target_slot(targets, view)
    rows = x.reshape(-1, D)

    def step(carry, i):
        dx, dw4 = carry
        logits, wi = _chunk_logits(x, w4, i, V)
        hit = (chunk_of == i)[..., None] & (jnp.arange(a * b) == column[..., None])
        d = (g[..., None] * (hit - jnp.exp(logits - lse[..., None]))).astype(x.dtype)  # g · d logp / d logits
        dx = dx + jnp.dot(d, wi.T, preferred_element_type=dx.dtype)
        dwi = jnp.dot(rows.T, d.reshape(-1, a * b), preferred_element_type=wide(w.dtype)).astype(w.dtype)
        return (dx, jax.lax.dynamic_update_index_in_dim(dw4, dwi.reshape(D, a, b), i, axis=2)), None

    start = (jnp.zeros(x.shape, wide(x.dtype)), jnp.zeros_like(w4))
    (dx, dw4), _ = jax.lax.scan(step, start, jnp.arange(n))
    return dx.astype(x.dtype), dw4.reshape(D, -1)[:, :V], None


_chunked_logps.defvjp(_chunked_fwd, _chunked_bwd)


# ----- Attention -----

# Causal attention over more queries than this runs by query blocks of about this size (see `attention`).
QUERY_BLOCK = 128


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float,
              impl: str = "auto", *, causal: bool = False) -> jax.Array:
    """Grouped-query dot-product attention with a float32 softmax.

    Args:
      q: float[B, T, N, H]; k, v: float[B, S, K, H] with N a multiple of K.
      mask: bool[B, T, S] (True = may attend) or None (full attention).
      scale: multiplier of the logits, usually H ** -0.5.
      impl: "xla" (these einsums: logits [B, K, N/K, T, S] in float32), or `jax.nn.dot_product_attention`:
        "cudnn" (cuDNN's fused flash attention on GPU, float16/bfloat16; the mask goes in as [B, 1, T, S])
        or "jax" (the same call on XLA, which checks the call on any backend); "splash": Pallas' TPU splash
        kernel with `mask` as its block mask (`models.splash`; interpret mode off TPU), for self-attention
        (keys at the queries' positions; a KV-cache call runs xla); "auto": splash on TPU, cudnn on a GPU
        for float16/bfloat16 inputs, else xla (the platform of the traced mesh's devices: the target's).
      causal: the keys are the queries' own positions (S = T) and `mask` hides every key after its query
        (or, with mask None, attention is causal). The xla path then splits the queries into blocks of
        about `QUERY_BLOCK` and gives each block only the keys up to its end: the same result for about
        half the work and memory at long T.

    Returns:
      float[B, T, N, H] in q's dtype. A query row with nothing to attend to gets a uniform average (as
      transformers' additive-minimum mask does); callers ignore such (padding) rows.
    """
    if impl == "auto":
        half = q.dtype in (jnp.bfloat16, jnp.float16)
        impl = {"tpu": "splash", "gpu": "cudnn" if half else "xla"}.get(sharding.target_platform(), "xla")
    T = q.shape[1]
    if impl == "splash" and k.shape[1] == T:
        if causal and mask is None:
            mask = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (q.shape[0], T, T))
        return splash.attention(q, k, v, mask, scale)
    if impl not in ("xla", "splash"):
        if mask is not None and mask.shape[1] == mask.shape[2]:  # a fully masked (padding) row sees itself:
            mask = mask | jnp.eye(mask.shape[1], dtype=bool)  # a flash kernel gives NaN, which 0-cotangents keep
        return jax.nn.dot_product_attention(q, k, v, mask=None if mask is None else mask[:, None], scale=scale,
                                            implementation="cudnn" if impl == "cudnn" else "xla")
    if causal and mask is None:
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (q.shape[0], T, T))
    if not causal or T <= QUERY_BLOCK:
        return _dense_attention(q, k, v, mask, scale)
    size = -(-T // -(-T // QUERY_BLOCK))  # blocks of equal size (the last one shorter by < their number)
    blocks = [_dense_attention(q[:, a:a + size], k[:, :a + size], v[:, :a + size], mask[:, a:a + size, :a + size],
                               scale) for a in range(0, T, size)]
    return jnp.concatenate(blocks, axis=1)


def _dense_attention(q, k, v, mask, scale):
    """The einsum path of `attention`: logits float32[B, K, N/K, T, S] (mask bool[B, T, S] or None)."""
    B, T, N, H = q.shape
    K = k.shape[2]
    q = q.reshape(B, T, K, N // K, H)
    logits = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=wide(q.dtype)) * scale
    if mask is not None:
        logits = jnp.where(mask[:, None, None], logits, jnp.finfo(logits.dtype).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(B, T, N, H)


def causal_mask(attention_mask: jax.Array) -> jax.Array:
    """bool[B, T, T] from a padding mask int[B, T]: key k is visible to query q iff k ≤ q and k is a token."""
    T = attention_mask.shape[1]
    causal = jnp.tril(jnp.ones((T, T), dtype=bool))
    return causal[None] & (attention_mask[:, None, :] > 0)


# ----- Rotary position embedding -----

def rope_inv_freq(head_dim: int, rope: dict) -> tuple[np.ndarray, float]:
    """Inverse frequencies float32[H/2] and the cos/sin scale for the rope kinds transformers names.

    Follows transformers' `modeling_rope_utils` (computed in float32 like it is).
    """
    kind, base = rope["rope_type"], rope["rope_theta"]
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(base), exponents)).astype(np.float32)
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return (inv_freq / np.float32(rope["factor"])).astype(np.float32), 1.0
    if kind == "llama3":
        factor, lo, hi = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old_len = rope["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / hi) & ~(wavelen > old_len / lo)
        return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
    if kind == "yarn":
        return _yarn(head_dim, base, rope)
    raise ValueError(f"rope_type {kind!r} is not supported")


def _yarn(dim: int, base: float, rope: dict) -> tuple[np.ndarray, float]:
    factor, orig = rope["factor"], rope["original_max_position_embeddings"]
    attention_factor = rope.get("attention_factor")
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")

    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast, beta_slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    pos_freqs = np.power(np.float32(base), np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    extra_factor = 1 - ramp
    inv_freq = interpolation * (1 - extra_factor) + extrapolation * extra_factor
    return inv_freq.astype(np.float32), float(attention_factor)


def mrope_rows(section: Sequence[int], interleaved: bool = False) -> tuple[int, ...]:
    """Per frequency (H/2 of them) the M-RoPE position row it rotates by: 0 t, 1 h, 2 w.

    Contiguous (Qwen2-VL, Qwen2.5-VL: `Qwen2_5_VLRotaryEmbedding`): chunks of `section` sizes, chunk i on
    row i % 3. Interleaved (Qwen3-VL: `Qwen3VLTextRotaryEmbedding`): frequency f is h where f % 3 == 1 and
    f < 3·section[1], w where f % 3 == 2 and f < 3·section[2], else t."""
    if not interleaved:
        return tuple(int(r) for r in np.concatenate([np.full(n, i % 3) for i, n in enumerate(section)]))
    f = np.arange(sum(section))
    rows = np.where((f % 3 == 1) & (f < 3 * section[1]), 1, 0)
    return tuple(int(r) for r in np.where((f % 3 == 2) & (f < 3 * section[2]), 2, rows))


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray, scale: float, dtype,
                 mrope: Sequence[int] = ()) -> tuple[jax.Array, jax.Array]:
    """cos, sin float[B, T, H] for integer positions (angles in float32).

    positions: int[B, T] (1D RoPE), or int[B, 3, T] (t, h, w) rows for M-RoPE, where `mrope` gives per
    frequency the row it rotates by (`mrope_rows`); 1D positions with M-RoPE are three equal rows
    (text-only rows).
    """
    positions = positions.astype(jnp.float32)
    if mrope:
        if positions.ndim == 2:
            positions = positions[:, None]
        positions = jnp.moveaxis(jnp.broadcast_to(positions, (positions.shape[0], 3, positions.shape[-1]))[
            :, np.asarray(mrope)], 1, -1)  # [B, T, H/2]
    else:
        positions = positions[..., None]
    angles = positions * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return (jnp.cos(angles) * scale).astype(dtype), (jnp.sin(angles) * scale).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x float[B, T, N, H] by the half-split convention of transformers' `rotate_half`; with cos/sin
    narrower than H (a partial rotary factor), only the first channels rotate."""
    if cos.shape[-1] < x.shape[-1]:
        r = cos.shape[-1]
        return jnp.concatenate([apply_rope(x[..., :r], cos, sin), x[..., r:]], axis=-1)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


# ----- Rematerialization -----

REMAT = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmul outputs
}


def maybe_remat(fn, policy: str):
    """Wraps `fn(module, *args)` in `nnx.remat` with a named policy ("none" returns fn unchanged)."""
    if policy == "none":
        return fn
    return nnx.remat(fn, policy=REMAT[policy], prevent_cse=True)


# ----- Stacked layers -----

STACKED = "layers"  # the logical name of a stacked parameter's leading axis (never sharded)


def stack(modules: Sequence[nnx.Module], block: int | None = None) -> nnx.Module:
    """One module holding the parameters of `modules` (all of one structure) stacked on a new leading
    axis, for `scan`. Each stacked parameter's `logical_axes` gain `STACKED` in front and its metadata
    `stacked_depth` counts the path components below the stacked module (`models/hf.py` puts the layer
    number there: `layers.self_attn.q_proj.kernel[i]` is `layers.{i}.self_attn.q_proj.weight`).

    `block`: each module is a list of that many consecutive layers (a hybrid decoder's repeating pattern),
    so that `layers.{j}.linear_attn.….kernel[i]` is layer i·block + j (metadata `stacked_block`)."""
    graphdef, state = nnx.split(modules[0])
    state = jax.tree.map(lambda *xs: jnp.stack(xs), *(nnx.state(m) for m in modules))
    for path, variable in nnx.to_flat_state(state):
        meta = variable.get_metadata()
        extra = {"shard_units": (1, *meta["shard_units"])} if "shard_units" in meta else {}
        if meta.get("logical_axes") is not None:
            extra["logical_axes"] = (STACKED, *meta["logical_axes"])
        if block is not None:
            extra["stacked_block"] = block
        variable.set_metadata(stacked_depth=len(path), **extra)
    return nnx.merge(graphdef, state)


def scan(stacked: nnx.Module, fn, carry, xs=None, remat: str = "none", count: int | None = None):
    """`jax.lax.scan` over the layers of a `stack`ed module: fn(layer, carry, x) -> (carry, y) runs once
    per layer with that layer's parameters (and `xs`' slice); returns (carry, stacked ys). The layer body
    is traced and compiled once whatever the depth; `remat` names a policy of `REMAT` for it; `count`:
    only the first `count` layers run."""
    graphdef, state = nnx.split(stacked)
    if count is not None:
        state = jax.tree.map(lambda a: a[:count], state)

    def body(carry, inputs):
        layer_state, x, i = inputs
        with lora.fold_dropout_key(i):  # each layer's adapters draw their own dropout masks
            return fn(nnx.merge(graphdef, layer_state), carry, x)

    if remat != "none":
        body = jax.checkpoint(body, policy=REMAT[remat], prevent_cse=False)  # scan keeps XLA from merging
    n = jax.tree.leaves(state)[0].shape[0]
    return jax.lax.scan(body, carry, (state, xs, jnp.arange(n, dtype=jnp.uint32)))
