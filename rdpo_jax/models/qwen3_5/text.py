"""Qwen3.5's hybrid decoder (transformers' `Qwen3_5TextModel`): layers of Gated DeltaNet (`models/deltanet.py`)
or gated full attention, as `layer_types` lists them, each followed by a SwiGLU MLP (a MoE with a shared
expert in Qwen3.5-MoE). Every norm is zero-centred, (1 + w), except the DeltaNet's output norm; attention
rotates the first `rotary_dim` channels of each head with interleaved M-RoPE.

Scanned, the repeating pattern (three DeltaNet layers and one attention layer on the Hub) is the scan's
body: `layers.stack(..., block=p)` stacks blocks of p layers, so compile time stays flat in depth. The
DeltaNet layers' view of the rows (`deltanet.lineage`) is read from the mask once per forward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from rdpo_jax.models import deltanet, layers, moe, text
from rdpo_jax.models.layers import Embed, RMSNorm
from rdpo_jax.models.qwen3_5.config import LINEAR, HybridTextConfig
from rdpo_jax.sharding import shard_activation


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: HybridTextConfig, kind: str, *, param_dtype, dtype, rngs: layers.InitKeys,
                 attention: str = "auto"):
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, zero_centred=True, **kw)
        if kind == LINEAR:
            self.linear_attn = deltanet.GatedDeltaNet(cfg.hidden_size, cfg.deltanet, cfg.rms_norm_eps, **kw)
        else:
            self.self_attn = text.Attention(cfg, attention=attention, gated=True, zero_centred=True, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, zero_centred=True, **kw)
        self.mlp = moe.SparseMoE(cfg.hidden_size, cfg.moe, cfg.hidden_act, **kw) if cfg.moe else layers.MLP(
            cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=False, **kw)
        self.kind, self.sparse = kind, cfg.moe is not None

    def __call__(self, x, mask, lin, cos, sin, cache=None, slot=None):
        """-> (x, this layer's new cache or None, the router's (probs, chosen) if sparse else None)."""
        h = self.input_layernorm(x)
        if self.kind == LINEAR:
            out = self.linear_attn(h, lin, cache)
        else:
            out = self.self_attn(h, mask, cos, sin, None if cache is None else (*cache, slot))
        out, new = out if cache is not None else (out, None)
        x = x + out
        h, routing = self.mlp(self.post_attention_layernorm(x)) if self.sparse else (
            self.mlp(self.post_attention_layernorm(x)), None)
        return shard_activation(x + h, text.ACT), new, routing


def period(types: tuple[str, ...]) -> int:
    """The shortest p such that the layer types repeat every p layers."""
    n = len(types)
    return next(p for p in range(1, n + 1) if n % p == 0 and types == types[:p] * (n // p))


class HybridDecoder(text.TextDecoder):
    """`TextDecoder`'s interface (call, `init_cache`, `repeat_cache`): a DeltaNet layer's cache is (conv tail
    float[B, K−1, C], state float32[B, H, Dk, Dv]), an attention layer's (k, v); scanned, each is stacked
    [num_layers / p, …] per position in the block."""

    def __init__(self, cfg: HybridTextConfig, *, param_dtype, dtype, remat: str, rngs: layers.InitKeys,
                 attention: str = "auto", scan: bool = False):
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"), **kw)
        built = [DecoderLayer(cfg, kind, attention=attention, **kw) for kind in cfg.layer_types]
        block = period(cfg.layer_types) if scan else 1  # no repetition: one block of every layer
        self.layers = layers.stack([nnx.List(built[i:i + block]) for i in range(0, cfg.num_layers, block)],
                                   block=block) if scan else nnx.List(built)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, zero_centred=True, **kw)
        inv_freq, self.rope_scale = layers.rope_inv_freq(cfg.rotary_dim, dict(cfg.rope))
        self.inv_freq = tuple(inv_freq.tolist())
        self.mrope = layers.mrope_rows(cfg.mrope_section, interleaved=True)
        self.scan, self.block, self.num_layers, self.moe = scan, block, cfg.num_layers, cfg.moe
        self.conv_kernel = cfg.deltanet.conv_kernel
        self.record_router = False
        self.remat, self.dtype = remat, dtype

    def __call__(self, x: jax.Array, mask: jax.Array, positions: jax.Array, cache=None, after_layer=None):
        """See `TextDecoder.__call__`; with a cache, T > 1 is a prefill from the start (slot 0) and T = 1 one
        decode step."""
        cos, sin = layers.rope_cos_sin(positions, self.inv_freq, self.rope_scale, self.dtype, self.mrope)
        x = shard_activation(x, text.ACT)
        hook = after_layer or (lambda i, x: x)
        T = x.shape[1]
        if cache is None:
            mask = mask & jnp.tril(jnp.ones((T, T), bool))
        lin = None if cache is not None and T == 1 else deltanet.lineage(mask, self.conv_kernel)
        caches, slot = cache if cache is not None else (None, None)
        valid = jnp.diagonal(mask[:, :, :T], axis1=1, axis2=2).reshape(-1)
        stats = functools.partial(self.routing_stats, valid=valid)

        # Rematerialized per layer, also inside a scanned block: the backward then holds one layer's
        # residuals at a time, not a whole block's (a DeltaNet layer's are the largest of the model's).
        call = layers.maybe_remat(lambda layer, *a: layer(*a), self.remat if cache is None else "none")

        def run(layers_, x, total, caches, first):  # consecutive layers from layer index `first`
            new = []
            for j, layer in enumerate(layers_):
                x, c, routing = call(layer, x, mask, lin, cos, sin, None if caches is None else caches[j], slot)
                x, total = hook(first + j, x), total + stats(routing)
                new.append(c)
            return x, total, new

        if self.scan:
            def body(block, carry, inputs):
                x, total = carry
                c, i = inputs
                x, total, new = run(block, x, total, c, i * self.block)
                return (x, total), (new if caches is not None else None)

            index = jnp.arange(self.num_layers // self.block, dtype=jnp.int32)
            (x, total), caches = layers.scan(self.layers, body, (x, stats(None)), (caches, index))
        else:
            x, total, caches = run(self.layers, x, stats(None), caches, 0)
        if cache is not None:
            return self.norm(x), caches
        if self.moe and self.record_router:
            self.sow(nnx.Intermediate, "router_stats", total)
        return self.norm(x)

    def init_cache(self, batch: int, length: int, dtype):
        """Empty caches: per layer (looped) or per position in the block (scanned, stacked over blocks) a
        DeltaNet's (conv tail, state) or attention's (k, v) float[batch, length, K, H]."""
        template = self.layers if self.scan else list(self.layers)
        out = []
        for j in range(self.block if self.scan else self.num_layers):
            layer = template[j]
            if layer.kind == LINEAR:
                one = layer.linear_attn.init_cache(batch, dtype)
            else:
                shape = (batch, length, layer.self_attn.num_kv_heads, layer.self_attn.head_dim)
                one = (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
            out.append(jax.tree.map(lambda a: jnp.broadcast_to(a, (self.num_layers // self.block, *a.shape)), one)
                       if self.scan else one)
        return out
