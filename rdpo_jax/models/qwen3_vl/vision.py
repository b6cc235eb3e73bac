"""The Qwen3-VL vision tower, as transformers' `Qwen3VLVisionModel`.

The input is Qwen2.5-VL's (`qwen2_5_vl/vision.py`): per batch row one buffer of the row's images' patch
rows with per-patch metadata (image, row, col), masks built in the program. Differences: the patch
embedding has a bias; a learned square table of positions is resampled to each image's grid (bilinear,
corners aligned, as transformers' `get_vision_interpolation_indices_and_weights`) and added to it; blocks
are LayerNorm + a plain MLP with full attention within each image (no windows); and the hidden states
after the `deepstack_visual_indexes` blocks go through their own mergers to the decoder (DeepStack).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rdpo_jax.models import layers
from rdpo_jax.models.layers import Embed, LayerNorm, Linear
from rdpo_jax.models.qwen2_5_vl.vision import PatchEmbed, VisionAttention, rotary
from rdpo_jax.models.qwen3_vl.config import Qwen3VisionConfig
from rdpo_jax.sharding import shard_activation

EPS = 1e-6  # transformers hard-codes the tower's LayerNorm eps


class VisionMLP(nnx.Module):
    def __init__(self, cfg: Qwen3VisionConfig, *, param_dtype, dtype, rngs: layers.InitKeys):
        kw = dict(bias=True, param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.linear_fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.linear_fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)
        self.act = layers.activation(cfg.hidden_act)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: Qwen3VisionConfig, *, param_dtype, dtype, rngs: layers.InitKeys, attention: str = "auto"):
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.norm1 = LayerNorm(cfg.hidden_size, EPS, **kw)
        self.norm2 = LayerNorm(cfg.hidden_size, EPS, **kw)
        self.attn = VisionAttention(cfg, attention=attention, **kw)
        self.mlp = VisionMLP(cfg, **kw)

    def __call__(self, x, mask, cos, sin):
        x = x + self.attn(self.norm1(x), mask, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """Each 2×2 block's four consecutive rows as one vector → Linear → GELU → Linear, the LayerNorm before
    the grouping (the final merger) or after it (`postshuffle`: the DeepStack mergers)."""

    def __init__(self, cfg: Qwen3VisionConfig, *, postshuffle: bool, param_dtype, dtype, rngs: layers.InitKeys):
        self.group = cfg.merge_size ** 2
        d4 = cfg.hidden_size * self.group
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.norm = LayerNorm(d4 if postshuffle else cfg.hidden_size, EPS, **kw)
        self.linear_fc1 = Linear(d4, d4, ("embed", "mlp"), bias=True, **kw)
        self.linear_fc2 = Linear(d4, cfg.out_hidden_size, ("mlp", "embed"), bias=True, **kw)
        self.postshuffle = postshuffle

    def __call__(self, x: jax.Array) -> jax.Array:
        B, N, _ = x.shape
        x = self.norm(x.reshape(B, N // self.group, -1)) if self.postshuffle else self.norm(x).reshape(
            B, N // self.group, -1)
        # the batch's rows, as the tower's: the 4D-wide norm would otherwise have XLA split the width over
        # chips and all-reduce every row's fc1 output on every chip (2.25 GiB per merger at Qwen3-VL-8B)
        x = shard_activation(x, ("batch", None, "act_embed"))
        return self.linear_fc2(jax.nn.gelu(self.linear_fc1(x), approximate=False))


def position_taps(image: jax.Array, row: jax.Array, col: jax.Array, side: int) -> tuple[jax.Array, jax.Array]:
    """(indices int32[B, N, 4], weights float32[B, N, 4]) into the flattened side × side position table:
    the four bilinear taps (corners aligned) of each patch's place in its image's grid.

    An image's grid is read in the program from its last patch, the bottom-right one in merge-block
    order: a reverse running minimum of image·2¹⁶ − row over the buffer gives every patch its image's
    largest row (images are consecutive, padding last) — no scatter, which XLA:TPU's cost model prices
    at −2 s."""
    big = 1 << 16  # more rows and columns than any grid has
    seg = jnp.where(image >= 0, image, jnp.max(image) + 1)

    def size(a):  # per patch: its image's extent along that axis
        return seg * big - jax.lax.cummin(seg * big - a, axis=1, reverse=True) + 1

    def axis(index, n):  # transformers' _interpolation_axis_taps_weights, bilinear, align_corners=True
        src = index.astype(jnp.float32) * (side - 1) / jnp.maximum(n - 1, 1).astype(jnp.float32)
        floor = jnp.floor(src)
        offsets = jnp.arange(2, dtype=jnp.float32)
        taps = jnp.clip(floor[..., None] + offsets, 0, side - 1).astype(jnp.int32)
        return taps, jnp.maximum(1 - jnp.abs(src[..., None] - floor[..., None] - offsets), 0)

    (ht, hw), (wt, ww) = axis(row, size(row)), axis(col, size(col))
    indices = (ht[..., :, None] * side + wt[..., None, :]).reshape(*row.shape, 4)
    return indices, (hw[..., :, None] * ww[..., None, :]).reshape(*row.shape, 4)


class Qwen3VisionTower(nnx.Module):
    """Call: `tower(patches float[B, N, C·T·P·P], image, row, col int32[B, N])` -> (features
    float[B, N/merge², out], DeepStack features float[B, K, N/merge², out]); metadata as Qwen2.5-VL's."""

    def __init__(self, cfg: Qwen3VisionConfig, *, param_dtype=jnp.float32, dtype=jnp.float32, remat: str = "none",
                 rngs: layers.InitKeys, attention: str = "auto", scan: bool = False):
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.patch_embed = nnx.Dict(proj=PatchEmbed(cfg, bias=True, **kw))
        self.pos_embed = Embed(cfg.num_position_embeddings, cfg.hidden_size, (None, "embed"), **kw)
        blocks = [VisionBlock(cfg, attention=attention, **kw) for _ in range(cfg.depth)]
        # scan: one VisionBlock with parameters stacked [depth, …] (`layers.stack`), else a list
        self.blocks = layers.stack(blocks) if scan else nnx.List(blocks)
        self.merger = PatchMerger(cfg, postshuffle=False, **kw)
        self.deepstack_merger_list = nnx.List([PatchMerger(cfg, postshuffle=True, **kw)
                                               for _ in cfg.deepstack_visual_indexes])
        self.config, self.remat, self.scan = cfg, remat, scan

    def __call__(self, patches, image, row, col) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        mask = (image[:, :, None] == image[:, None, :]) & (image[:, :, None] >= 0)
        cos, sin = rotary(row, col, cfg.head_dim, cfg.rope_theta)
        x = self.patch_embed["proj"](patches)
        indices, weights = position_taps(image, row, col, cfg.position_side)
        # whole on every device (2304 × 1152 at most): a lookup into a width-sharded table gives width-sharded
        # rows, which XLA could only reshard to the batch's rows by gathering them whole
        table = shard_activation(self.pos_embed.embedding[...], (None, None))
        x = x + (jnp.take(table, indices, axis=0) * weights[..., None].astype(table.dtype)).sum(-2).astype(x.dtype)
        levels = cfg.deepstack_visual_indexes
        if self.scan:  # the DeepStack blocks' outputs kept in a carry: one program for every block
            at = jnp.asarray(levels, jnp.int32)

            def body(block, carry, i):
                x, kept = carry
                x = block(x, mask, cos, sin)
                return (x, jnp.where((at == i)[:, None, None, None], x[None], kept)), None

            kept = shard_activation(jnp.zeros((len(levels), *x.shape), x.dtype), (None, "batch", None, "act_embed"))
            (x, kept), _ = layers.scan(self.blocks, body, (x, kept), jnp.arange(cfg.depth, dtype=jnp.int32),
                                       remat=self.remat)
            kept = list(kept)
        else:
            run, kept = layers.maybe_remat(lambda block, *a: block(*a), self.remat), []
            for i, block in enumerate(self.blocks):
                x = run(block, x, mask, cos, sin)
                if i in levels:  # increasing (`config.vision_from_hf`)
                    kept.append(x)
        deepstack = [merger(h) for merger, h in zip(self.deepstack_merger_list, kept)]
        deepstack = shard_activation(jnp.stack(deepstack, axis=1), ("batch", None, None, "act_embed")) if deepstack \
            else None
        return self.merger(x), deepstack
