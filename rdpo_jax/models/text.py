"""Text decoder of the Llama / Qwen2 / Qwen3 kind (transformers' `LlamaModel`, `Qwen2Model`, `Qwen3Model`).

GQA with RoPE, RMSNorm, SwiGLU MLP; optional q/k/v bias (Qwen2), q/k RMSNorm per head (Qwen3).
Attention takes an explicit boolean mask bool[B, T, S] and integer positions int[B, T] (int[B, 3, T] with
the Qwen2-VL family's M-RoPE), so that packed layouts (shared-prefix pairs) use the same code as plain
causal sequences.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from rdpo_jax.models import layers, moe
from rdpo_jax.models.config import TextConfig, UnsupportedConfigError
from rdpo_jax.models.layers import Embed, Linear, RMSNorm
from rdpo_jax.sharding import shard_activation

ACT = ("batch", "seq", "act_embed")


class Attention(nnx.Module):
    """`gated` (Qwen3.5's gated attention): q_proj also gives each head a gate, its rows [q₀ g₀ q₁ g₁ …],
    and the heads' outputs are multiplied by sigmoid(gate) before o_proj; `zero_centred`: the q/k norms'
    kind (`layers.RMSNorm`)."""

    def __init__(self, cfg: TextConfig, *, param_dtype, dtype, rngs: layers.InitKeys, attention: str = "auto",
                 gated: bool = False, zero_centred: bool = False):
        d, h = cfg.hidden_size, cfg.head_dim
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        q = (1 + gated) * h  # per head: the query (and its gate)
        # Head dimensions shard by whole heads: with fewer (KV) heads than tensor devices they are replicated.
        self.q_proj = Linear(d, cfg.num_heads * q, ("embed", "heads"), bias=cfg.qkv_bias, units=(1, q), **kw)
        self.k_proj = Linear(d, cfg.num_kv_heads * h, ("embed", "kv_heads"), bias=cfg.qkv_bias, units=(1, h), **kw)
        self.v_proj = Linear(d, cfg.num_kv_heads * h, ("embed", "kv_heads"), bias=cfg.qkv_bias, units=(1, h), **kw)
        self.o_proj = Linear(cfg.num_heads * h, d, ("heads", "embed"), bias=cfg.o_bias, units=(h, 1), **kw)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(h, cfg.rms_norm_eps, axes=("head_dim",), zero_centred=zero_centred, **kw)
            self.k_norm = RMSNorm(h, cfg.rms_norm_eps, axes=("head_dim",), zero_centred=zero_centred, **kw)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, h
        self.qk_norm, self.attention, self.gated = cfg.qk_norm, attention, gated

    def __call__(self, x: jax.Array, mask: jax.Array, cos: jax.Array, sin: jax.Array, cache=None):
        """x float[B, T, D], mask bool[B, T, S], cos/sin float[B, T, H] -> float[B, T, D].

        With `cache` = (k, v, index), k/v float[B, S, K, H]: this call's keys and values are written at
        positions index…index+T of the cache and attention runs over all S cached positions (the mask
        says which are filled); returns (out, (k, v)) then. Without a cache, S = T.
        """
        B, T, _ = x.shape
        q = self.q_proj(x).reshape(B, T, self.num_heads, -1)
        if self.gated:
            q, gate = jnp.split(q, 2, axis=-1)
        k = self.k_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
        q = shard_activation(q, ("batch", "seq", "act_heads", None))
        k = shard_activation(k, ("batch", "seq", "act_heads", None))
        v = shard_activation(v, ("batch", "seq", "act_heads", None))
        if cache is not None:
            k_cache, v_cache, index = cache
            k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), index, axis=1)
        # Without a cache the keys are the queries' positions and the decoder's mask is causal (below).
        out = layers.attention(q, k, v, mask, self.head_dim ** -0.5, self.attention, causal=cache is None)
        if self.gated:
            out = out * jax.nn.sigmoid(gate)
        out = self.o_proj(out.reshape(B, T, self.num_heads * self.head_dim))
        return out if cache is None else (out, (k, v))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, param_dtype, dtype, rngs: layers.InitKeys, attention: str = "auto",
                 sparse: bool = False):
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.self_attn = Attention(cfg, attention=attention, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mlp = moe.SparseMoE(cfg.hidden_size, cfg.moe, cfg.hidden_act, **kw) if sparse else layers.MLP(
            cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=cfg.mlp_bias, **kw)
        self.sparse = sparse

    def __call__(self, x, mask, cos, sin, cache=None):
        """-> (x, this call's (k, v) with a cache else None, the router's (probs, chosen) if sparse else None)."""
        attn = self.self_attn(self.input_layernorm(x), mask, cos, sin, cache)
        attn, kv = attn if cache is not None else (attn, None)
        x = x + attn
        h, routing = self.mlp(self.post_attention_layernorm(x)) if self.sparse else (
            self.mlp(self.post_attention_layernorm(x)), None)
        return shard_activation(x + h, ACT), kv, routing


class TextDecoder(nnx.Module):
    """Embedding, decoder layers and the final norm; the LM head lives in the VLM (it may be tied)."""

    def __init__(self, cfg: TextConfig, *, param_dtype, dtype, remat: str, rngs: layers.InitKeys,
                 attention: str = "auto", scan: bool = False):
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"), **kw)
        sparse = [cfg.moe is not None and i in cfg.moe.layers for i in range(cfg.num_layers)]
        if scan and len(set(sparse)) > 1:
            raise UnsupportedConfigError(
                f"scanned decoder layers must all be alike, but layers {[i for i, s in enumerate(sparse) if not s]} "
                "are dense and the others sparse (text_config.mlp_only_layers, decoder_sparse_step): set "
                "model.scan_layers=off")
        stack = [DecoderLayer(cfg, attention=attention, sparse=s, **kw) for s in sparse]
        # scan: one DecoderLayer whose parameters are stacked [num_layers, …] (`layers.stack`), else a list
        self.layers = layers.stack(stack) if scan else nnx.List(stack)
        self.scan, self.num_layers, self.moe = scan, cfg.num_layers, cfg.moe
        # Set by the trainer (`nnx.Module.set_attributes`): forwards without a cache sow the routers'
        # `moe.router_stats`, summed over the sparse layers, as nnx.Intermediate "router_stats".
        self.record_router = False
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.inv_freq, self.rope_scale = layers.rope_inv_freq(cfg.head_dim, dict(cfg.rope))
        self.inv_freq = tuple(self.inv_freq.tolist())  # hashable static metadata, not a parameter
        self.mrope = layers.mrope_rows(cfg.mrope_section, cfg.mrope_interleaved) if cfg.mrope_section else ()
        self.remat, self.dtype = remat, dtype

    def __call__(self, x: jax.Array, mask: jax.Array, positions: jax.Array, cache=None, after_layer=None):
        """Input embeddings float[B, T, D] -> final hidden states float[B, T, D]; positions int[B, T], or
        int[B, 3, T] for M-RoPE (see `layers.rope_cos_sin`).

        `cache` (sampling): (per-layer list of (k, v) float[B, S, K, H], write index); returns
        (hidden, new per-layer list) then. See `Attention`.
        `after_layer(i, x) -> x`: runs on each layer's output (i the layer's index: an int, or a traced int32
        scalar when the layers are scanned), e.g. Qwen3-VL's DeepStack features added to the first layers' image positions.
        """
        cos, sin = layers.rope_cos_sin(positions, self.inv_freq, self.rope_scale, self.dtype, self.mrope)
        x = shard_activation(x, ACT)
        hook = after_layer or (lambda i, x: x)
        index = jnp.arange(self.num_layers, dtype=jnp.int32)
        if cache is not None:
            kvs, slot = cache
            if self.scan:  # (k, v) float[L, B, S, K, H]: each layer's slice in, its updated slice out
                def body(layer, x, inputs):
                    kv, i = inputs
                    x, kv, _ = layer(x, mask, cos, sin, (*kv, slot))
                    return hook(i, x), kv

                x, kvs = layers.scan(self.layers, body, x, (kvs, index))
                return self.norm(x), kvs
            new = []
            for i, (layer, (k, v)) in enumerate(zip(self.layers, kvs)):
                x, kv, _ = layer(x, mask, cos, sin, (k, v, slot))
                x = hook(i, x)
                new.append(kv)
            return self.norm(x), new
        T = x.shape[1]
        mask = mask & jnp.tril(jnp.ones((T, T), bool))  # a decoder: no query sees a later key, whatever the layout
        valid = jnp.diagonal(mask, axis1=1, axis2=2).reshape(-1)  # a real token sees itself; padding nothing
        stats = functools.partial(self.routing_stats, valid=valid)

        if self.scan:
            def body(layer, carry, i):
                x, total = carry
                x, _, routing = layer(x, mask, cos, sin)
                return (hook(i, x), total + stats(routing)), None

            (x, total), _ = layers.scan(self.layers, body, (x, stats(None)), index, remat=self.remat)
        else:
            run = layers.maybe_remat(lambda layer, *a: layer(*a), self.remat)
            total = stats(None)
            for i, layer in enumerate(self.layers):
                x, _, routing = run(layer, x, mask, cos, sin)
                x, total = hook(i, x), total + stats(routing)
        if self.moe and self.record_router:
            self.sow(nnx.Intermediate, "router_stats", total)
        return self.norm(x)

    def routing_stats(self, routing, valid: jax.Array) -> jax.Array:
        """float[3, E] of one layer (`moe.router_stats` over the real tokens `valid` bool[B·T]; zeros for a
        dense layer's routing None), in the router's float32 or wider."""
        E = self.moe.num_experts if self.moe else 0
        return jnp.zeros((3, E), layers.wide(self.dtype)) if routing is None else moe.router_stats(
            *routing, valid, E)

    def init_cache(self, batch: int, length: int, dtype):
        """Empty key/value caches float[batch, length, K, H]: a per-layer list of (k, v), or with scanned
        layers one (k, v) pair stacked [num_layers, batch, length, K, H]."""
        attn = (self.layers if self.scan else self.layers[0]).self_attn
        shape = (batch, length, attn.num_kv_heads, attn.head_dim)
        if self.scan:
            return jnp.zeros((self.num_layers, *shape), dtype), jnp.zeros((self.num_layers, *shape), dtype)
        return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in self.layers]

    def repeat_cache(self, cache, n: int):
        """Each row of a cache from `init_cache` repeated n times (n samples per prompt)."""
        axis = 1 if self.scan else 0
        return jax.tree.map(lambda a: jnp.repeat(a, n, axis=axis), cache)
