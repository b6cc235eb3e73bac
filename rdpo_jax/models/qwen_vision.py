"""The Qwen2.5-VL vision tower, as transformers' `Qwen2_5_VisionTransformerPretrainedModel`.

Input: the patch rows of `data/qwen_vl_images.py` (float[N, C·T·P·P], merge-block-major) of every image
of a batch packed into one buffer, with per-patch metadata — which image (−1: padding) and the patch's
row and column in its image's grid. Window and image membership are attention masks built from that
metadata inside the program (transformers permutes patches into windows and splits the sequence on the
host), so one compiled program serves every mix of image sizes that fits the buffer. Attention is
non-causal and permutation-equivariant, so masking in place equals transformers' permute → attend →
un-permute. Output: one feature per 2×2 merge block (float[N/4, out_hidden_size]), in patch order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rdpo_jax.models import layers
from rdpo_jax.models.config import QwenVisionConfig
from rdpo_jax.models.layers import Linear, RMSNorm

EPS = 1e-6  # transformers hard-codes the vision RMSNorm eps (it is not read from the config)


def patch_metadata(grids, cfg: QwenVisionConfig, num_patches: int) -> dict[str, np.ndarray]:
    """Host-side metadata of a patch buffer holding `grids` ((1, h, w) per image, in order) padded to
    `num_patches`: image int32[N] (−1 = padding), row, col int32[N] (the patch's place in its image's grid,
    merge-block-major as the rows are)."""
    image, row, col = (np.full(num_patches, v, np.int32) for v in (-1, 0, 0))
    start, m = 0, cfg.merge_size
    for i, (t, h, w) in enumerate(grids):
        if t != 1 or h % m or w % m:
            raise ValueError(f"image {i}: grid {(t, h, w)} must be a still image with sides multiples of {m}")
        r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = (h // m, m, w // m, m)
        n = h * w
        if start + n > num_patches:
            raise ValueError(f"images of {sum(g[1] * g[2] for g in grids)} patches exceed the buffer of {num_patches}")
        image[start:start + n] = i
        row[start:start + n] = r.reshape(block).transpose(0, 2, 1, 3).ravel()
        col[start:start + n] = c.reshape(block).transpose(0, 2, 1, 3).ravel()
        start += n
    return dict(image=image, row=row, col=col)


class VisionAttention(nnx.Module):
    def __init__(self, cfg: QwenVisionConfig, *, param_dtype, dtype, rngs: layers.InitKeys):
        d = cfg.hidden_size
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.qkv = Linear(d, 3 * d, ("embed", None), bias=True, **kw)
        self.proj = Linear(d, d, (None, "embed"), bias=True, **kw)
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim

    def __call__(self, x: jax.Array, mask: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        N = x.shape[0]
        q, k, v = jnp.moveaxis(self.qkv(x).reshape(N, 3, self.heads, self.head_dim), 1, 0)

        def rotate(t):  # in float32, as transformers' apply_rotary_pos_emb_vision
            t32 = t.astype(jnp.float32)
            t1, t2 = jnp.split(t32, 2, axis=-1)
            return (t32 * cos[:, None] + jnp.concatenate([-t2, t1], -1) * sin[:, None]).astype(t.dtype)

        out = layers.attention(rotate(q)[None], rotate(k)[None], v[None], mask[None], self.head_dim ** -0.5)
        return self.proj(out[0].reshape(N, -1))


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
    def __init__(self, cfg: QwenVisionConfig, *, param_dtype, dtype, rngs: layers.InitKeys):
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.norm1 = RMSNorm(cfg.hidden_size, EPS, **kw)
        self.norm2 = RMSNorm(cfg.hidden_size, EPS, **kw)
        self.attn = VisionAttention(cfg, **kw)
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
        x = self.ln_q(x).reshape(x.shape[0] // self.group, -1)
        return self.mlp["2"](jax.nn.gelu(self.mlp["0"](x), approximate=False))


class QwenVisionTower(nnx.Module):
    """Call: `tower(patches float[N, C·T·P·P], image, row, col int32[N]) -> float[N/merge², out_hidden_size]`
    (metadata from `patch_metadata`; N a multiple of merge², padding patches at the end)."""

    def __init__(self, cfg: QwenVisionConfig, *, param_dtype=jnp.float32, dtype=jnp.float32, rngs: layers.InitKeys):
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        c = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
        self.patch_embed = nnx.Dict(proj=Linear(c, cfg.hidden_size, (None, "embed"), bias=False, **kw))
        self.blocks = nnx.List([VisionBlock(cfg, **kw) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, **kw)
        self.config = cfg

    def masks(self, image: jax.Array, row: jax.Array, col: jax.Array) -> tuple[jax.Array, jax.Array]:
        """bool[N, N]: same image (full attention), and same image and window (window attention)."""
        cfg = self.config
        ws, m = cfg.window_tokens, cfg.merge_size
        wr, wc = row // m // ws, col // m // ws  # windows tile each image from its top-left
        same = (image[:, None] == image[None, :]) & (image[:, None] >= 0)
        return same, same & (wr[:, None] == wr[None, :]) & (wc[:, None] == wc[None, :])

    def __call__(self, patches: jax.Array, image: jax.Array, row: jax.Array, col: jax.Array) -> jax.Array:
        cfg = self.config
        full, windowed = self.masks(image, row, col)
        # 2D RoPE: head_dim/4 frequencies (over head_dim/2) for the row and for the column, then duplicated
        half = cfg.head_dim // 2
        inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, half, 2, dtype=np.float32) / half))
        angles = jnp.concatenate([row[:, None] * inv_freq, col[:, None] * inv_freq], -1).astype(jnp.float32)
        angles = jnp.concatenate([angles, angles], -1)
        cos, sin = jnp.cos(angles), jnp.sin(angles)
        x = self.patch_embed["proj"](patches)
        for i, block in enumerate(self.blocks):
            x = block(x, full if i in cfg.fullatt_block_indexes else windowed, cos, sin)
        return self.merger(x)
