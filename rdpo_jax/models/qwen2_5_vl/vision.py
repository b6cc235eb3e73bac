"""The Qwen2.5-VL vision tower, as transformers' `Qwen2_5_VisionTransformerPretrainedModel`.

Input: per batch row, the patch rows of `images.py` (float[N, C·T·P·P], merge-block-major) of
the row's images packed into one buffer, with per-patch metadata — which image (−1: padding) and the
patch's row and column in its image's grid. Window and image membership are attention masks built from that
metadata inside the program (transformers permutes patches into windows and splits the sequence on the
host), so one compiled program serves every mix of image sizes that fits the buffer. Attention is
non-causal and permutation-equivariant, so masking in place equals transformers' permute → attend →
un-permute. Output: one feature per 2×2 merge block (float[B, N/4, out_hidden_size]), in patch order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rdpo_jax.models import layers
from rdpo_jax.models.layers import Linear, RMSNorm
from rdpo_jax.models.qwen2_5_vl.config import QwenVisionConfig
from rdpo_jax.sharding import shard_activation

EPS = 1e-6  # transformers hard-codes the vision RMSNorm eps (it is not read from the config)


class VisionAttention(nnx.Module):
    def __init__(self, cfg: QwenVisionConfig, *, param_dtype, dtype, rngs: layers.InitKeys, attention: str = "auto"):
        d = cfg.hidden_size
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        h = cfg.head_dim  # heads shard whole over "tensor", as the text decoder's do
        self.qkv = layers.FusedLinear(d, 3, d, ("embed", "heads"), bias=True, units=(1, h), **kw)
        self.proj = Linear(d, d, ("heads", "embed"), bias=True, units=(h, 1), **kw)
        self.heads, self.head_dim, self.attention = cfg.num_heads, cfg.head_dim, attention

    def __call__(self, x: jax.Array, mask: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """x float[B, N, D], mask bool[B, N, N], cos/sin float32[B, N, head_dim] -> float[B, N, D]."""
        B, N, _ = x.shape
        q, k, v = jnp.moveaxis(self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim), 2, 0)
        q, k, v = (shard_activation(t, ("batch", None, "act_heads", None)) for t in (q, k, v))

        def rotate(t):  # in float32, as transformers' apply_rotary_pos_emb_vision
            t32 = t.astype(jnp.float32)
            t1, t2 = jnp.split(t32, 2, axis=-1)
            return (t32 * cos[:, :, None] + jnp.concatenate([-t2, t1], -1) * sin[:, :, None]).astype(t.dtype)

        out = layers.attention(rotate(q), rotate(k), v, mask, self.head_dim ** -0.5, self.attention)
        return self.proj(out.reshape(B, N, -1))


class VisionMLP(nnx.Module):
    def __init__(self, cfg: QwenVisionConfig, *, param_dtype, dtype, rngs: layers.InitKeys):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(bias=True, param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.gate_proj = Linear(d, f, ("embed", "mlp"), **kw)
        self.up_proj = Linear(d, f, ("embed", "mlp"), **kw)
        self.down_proj = Linear(f, d, ("mlp", "embed"), **kw)
        self.act = layers.activation(cfg.hidden_act)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: QwenVisionConfig, *, param_dtype, dtype, rngs: layers.InitKeys, attention: str = "auto"):
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.norm1 = RMSNorm(cfg.hidden_size, EPS, **kw)
        self.norm2 = RMSNorm(cfg.hidden_size, EPS, **kw)
        self.attn = VisionAttention(cfg, attention=attention, **kw)
        self.mlp = VisionMLP(cfg, **kw)

    def __call__(self, x, mask, cos, sin):
        x = x + self.attn(self.norm1(x), mask, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """RMSNorm, then each 2×2 block's four consecutive rows as one vector → Linear → GELU → Linear."""

    def __init__(self, cfg: QwenVisionConfig, *, param_dtype, dtype, rngs: layers.InitKeys):
        d4 = cfg.hidden_size * cfg.merge_size ** 2
        kw = dict(bias=True, param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.ln_q = RMSNorm(cfg.hidden_size, EPS, param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.mlp = nnx.Dict({"0": Linear(d4, d4, ("embed", "mlp"), **kw),  # transformers' nn.Sequential indices
                             "2": Linear(d4, cfg.out_hidden_size, ("mlp", "embed"), **kw)})
        self.group = cfg.merge_size ** 2

    def __call__(self, x: jax.Array) -> jax.Array:
        B, N, _ = x.shape
        x = self.ln_q(x).reshape(B, N // self.group, -1)
        return self.mlp["2"](jax.nn.gelu(self.mlp["0"](x), approximate=False))


class PatchEmbed(nnx.Module):
    """transformers' Conv3d with kernel = stride = (T, P, P) over one patch row: a matmul. The kernel is
    kept as float[C, T, P, P, D] (the Conv3d's [D, C, T, P, P] with the output last, as `hf.py` maps
    kernels), used as its [C·T·P·P, D] reshape."""

    def __init__(self, cfg: QwenVisionConfig, *, param_dtype, dtype, rngs: layers.InitKeys, bias: bool = False):
        shape = (cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size, cfg.hidden_size)
        self.kernel = layers.param(rngs, layers._normal, shape, param_dtype, (None, None, None, None, "embed"))
        self.bias = layers.param(rngs, layers._zeros, (cfg.hidden_size,), param_dtype, ("embed",)) if bias else None
        self.dtype = dtype

    def __call__(self, patches: jax.Array) -> jax.Array:
        kernel = self.kernel[...].reshape(-1, self.kernel.shape[-1])
        y = jnp.dot(patches.astype(self.dtype), kernel.astype(self.dtype))
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


def rotary(row: jax.Array, col: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin float32[B, N, head_dim] of the towers' 2D RoPE: head_dim/4 frequencies (over head_dim/2) for
    the patch's row and for its column, concatenated, then duplicated (transformers' "axial" rope)."""
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (np.arange(0, half, 2, dtype=np.float32) / half))
    angles = jnp.concatenate([row[..., None] * inv_freq, col[..., None] * inv_freq], -1).astype(jnp.float32)
    angles = jnp.concatenate([angles, angles], -1)
    return jnp.cos(angles), jnp.sin(angles)


class QwenVisionTower(nnx.Module):
    """Call: `tower(patches float[B, N, C·T·P·P], image, row, col int32[B, N]) -> float[B, N/merge², out]`
    (metadata from `data.qwen_vl_images.patch_metadata`, per row; N a multiple of merge², padding patches at the end)."""

    def __init__(self, cfg: QwenVisionConfig, *, param_dtype=jnp.float32, dtype=jnp.float32, remat: str = "none",
                 rngs: layers.InitKeys, attention: str = "auto", scan: bool = False):
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.patch_embed = nnx.Dict(proj=PatchEmbed(cfg, **kw))
        blocks = [VisionBlock(cfg, attention=attention, **kw) for _ in range(cfg.depth)]
        # scan: one VisionBlock with parameters stacked [depth, …] (`layers.stack`), else a list
        self.blocks = layers.stack(blocks) if scan else nnx.List(blocks)
        self.merger = PatchMerger(cfg, **kw)
        self.config, self.remat, self.scan = cfg, remat, scan

    def masks(self, image: jax.Array, row: jax.Array, col: jax.Array) -> tuple[jax.Array, jax.Array]:
        """bool[B, N, N]: same image (full attention), and same image and window (window attention)."""
        cfg = self.config
        ws, m = cfg.window_tokens, cfg.merge_size
        wr, wc = row // m // ws, col // m // ws  # windows tile each image from its top-left

        def equal(a):
            return a[:, :, None] == a[:, None, :]

        same = equal(image) & (image[:, :, None] >= 0)
        return same, same & equal(wr) & equal(wc)

    def __call__(self, patches: jax.Array, image: jax.Array, row: jax.Array, col: jax.Array) -> jax.Array:
        cfg = self.config
        full, windowed = self.masks(image, row, col)
        cos, sin = rotary(row, col, cfg.head_dim, cfg.rope_theta)
        x = self.patch_embed["proj"](patches)
        if self.scan:  # each block picks its mask by a per-block flag
            is_full = jnp.isin(jnp.arange(cfg.depth), jnp.asarray(cfg.fullatt_block_indexes, jnp.int32))
            x, _ = layers.scan(self.blocks, lambda block, x, f: (block(x, jnp.where(f, full, windowed), cos, sin), None),
                               x, is_full, remat=self.remat)
            return self.merger(x)
        run = layers.maybe_remat(lambda block, *a: block(*a), self.remat)
        for i, block in enumerate(self.blocks):
            x = run(block, x, full if i in cfg.fullatt_block_indexes else windowed, cos, sin)
        return self.merger(x)
