"""Vision towers: SigLIP and CLIP ViTs, as transformers' `SiglipVisionModel` / `CLIPVisionModel`.

Images are NHWC float32, already normalized by the family's image processor. The tower returns the
hidden states LLaVA selects (`vision_feature_layer`): index 0 is the embedding output (after CLIP's
pre-layernorm), index i the output of layer i. Only the layers up to the deepest selected one run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rdpo_jax.models import layers
from rdpo_jax.models.config import VisionConfig
from rdpo_jax.models.layers import LayerNorm, Linear, param
from rdpo_jax.sharding import shard_activation

ACT = ("batch", "seq", "act_embed")


class Embeddings(nnx.Module):
    """Patchify + linear patch projection (a stride-p convolution) + learned positions (+ CLIP class token)."""

    def __init__(self, cfg: VisionConfig, *, param_dtype, dtype, rngs: layers.InitKeys):
        p, c, d = cfg.patch_size, cfg.num_channels, cfg.hidden_size
        self.patch_embedding = nnx.Dict(
            kernel=param(rngs, layers._normal, (p, p, c, d), param_dtype, ("patch", "patch", None, "embed")))
        if cfg.family == "siglip":
            self.patch_embedding["bias"] = param(rngs, layers._zeros, (d,), param_dtype, ("norm",))
        else:
            self.class_embedding = param(rngs, layers._normal, (d,), param_dtype, ("norm",))
        self.position_embedding = layers.Embed(cfg.num_positions, d, ("position", "embed"),
                                               param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.family, self.patch, self.dtype = cfg.family, p, dtype

    def __call__(self, images: jax.Array) -> jax.Array:
        """images float[B, H, W, C] -> float[B, P(+1), D]."""
        B, H, W, C = images.shape
        p = self.patch
        x = images.astype(self.dtype).reshape(B, H // p, p, W // p, p, C).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(B, (H // p) * (W // p), p, p, C)
        x = jnp.einsum("bnijc,ijcd->bnd", x, self.patch_embedding["kernel"][...].astype(self.dtype))
        if self.family == "siglip":
            x = x + self.patch_embedding["bias"][...].astype(self.dtype)
        else:
            cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (B, 1, x.shape[-1]))
            x = jnp.concatenate([cls, x], axis=1)
        return x + self.position_embedding.embedding[...].astype(self.dtype)[None]


class EncoderLayer(nnx.Module):
    """Pre-norm ViT block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: VisionConfig, *, param_dtype, dtype, rngs: layers.InitKeys, attention: str = "auto"):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        h = d // cfg.num_heads  # head dimensions shard by whole heads
        self.layer_norm1 = LayerNorm(d, cfg.layer_norm_eps, **kw)
        self.self_attn = nnx.Dict(
            q_proj=Linear(d, d, ("embed", "heads"), bias=True, units=(1, h), **kw),
            k_proj=Linear(d, d, ("embed", "heads"), bias=True, units=(1, h), **kw),
            v_proj=Linear(d, d, ("embed", "heads"), bias=True, units=(1, h), **kw),
            out_proj=Linear(d, d, ("heads", "embed"), bias=True, units=(h, 1), **kw))
        self.layer_norm2 = LayerNorm(d, cfg.layer_norm_eps, **kw)
        self.mlp = nnx.Dict(fc1=Linear(d, f, ("embed", "mlp"), bias=True, **kw),
                            fc2=Linear(f, d, ("mlp", "embed"), bias=True, **kw))
        self.num_heads, self.act, self.attention = cfg.num_heads, layers.activation(cfg.hidden_act), attention

    def __call__(self, x: jax.Array) -> jax.Array:
        B, T, D = x.shape
        N = self.num_heads
        h = self.layer_norm1(x)
        a = self.self_attn
        q, k, v = (a[n](h).reshape(B, T, N, D // N) for n in ("q_proj", "k_proj", "v_proj"))
        h = layers.attention(q, k, v, None, (D // N) ** -0.5, self.attention).reshape(B, T, D)
        x = x + a["out_proj"](h)
        h = self.mlp["fc2"](self.act(self.mlp["fc1"](self.layer_norm2(x))))
        return shard_activation(x + h, ACT)


class PoolingHead(nnx.Module):
    """SigLIP's attention-pooling head. LLaVA never calls it; its weights are kept so that checkpoints
    round-trip exactly (stored in transformers' own layout, `torch.nn.MultiheadAttention` included)."""

    def __init__(self, cfg: VisionConfig, *, param_dtype, dtype, rngs: layers.InitKeys):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.probe = param(rngs, layers._normal, (1, 1, d), param_dtype, (None, None, "embed"))
        self.attention = nnx.Dict(
            in_proj_weight=param(rngs, layers._normal, (3 * d, d), param_dtype, (None, "embed")),
            in_proj_bias=param(rngs, layers._zeros, (3 * d,), param_dtype, (None,)),
            out_proj=Linear(d, d, ("heads", "embed"), bias=True, units=(d // cfg.num_heads, 1), **kw))
        self.layernorm = LayerNorm(d, cfg.layer_norm_eps, **kw)
        self.mlp = nnx.Dict(fc1=Linear(d, f, ("embed", "mlp"), bias=True, **kw),
                            fc2=Linear(f, d, ("mlp", "embed"), bias=True, **kw))


class VisionTower(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, param_dtype, dtype, remat: str, rngs: layers.InitKeys,
                 attention: str = "auto", scan: bool = False):
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.embeddings = Embeddings(cfg, **kw)
        if cfg.family == "clip":
            self.pre_layrnorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **kw)  # transformers' spelling
        stack = [EncoderLayer(cfg, attention=attention, **kw) for _ in range(cfg.num_layers)]
        # scan: one EncoderLayer with parameters stacked [num_layers, …] (`layers.stack`), else a list
        self.encoder = nnx.Dict(layers=layers.stack(stack) if scan else nnx.List(stack))
        self.scan = scan
        self.post_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **kw)  # unused by LLaVA
        if cfg.use_head:
            self.head = PoolingHead(cfg, **kw)
        self.family, self.remat = cfg.family, remat

    def __call__(self, images: jax.Array, feature_layers: tuple[int, ...]) -> list[jax.Array]:
        """images float[B, H, W, C] -> the selected hidden states, each float[B, P(+1), D]."""
        x = self.embeddings(images)
        if self.family == "clip":
            x = self.pre_layrnorm(x)
        x = shard_activation(x, ACT)
        depth = max(feature_layers)  # the layers after the last selected one never run
        if self.scan and depth:  # every layer's output stacked: hidden state i = ys[i - 1]
            _, ys = layers.scan(self.encoder["layers"], lambda layer, h, _: (layer(h),) * 2, x, remat=self.remat,
                                count=depth)
            return [x if i == 0 else ys[i - 1] for i in feature_layers]
        hidden = [x]
        run = layers.maybe_remat(lambda layer, h: layer(h), self.remat)
        for layer in self.encoder["layers"][: max(feature_layers)]:
            x = run(layer, x)
            hidden.append(x)
        return [hidden[i] for i in feature_layers]
