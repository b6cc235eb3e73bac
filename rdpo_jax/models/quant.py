"""Blockwise quantization of frozen kernels for QLoRA: the base model's projection kernels are stored as
int8 or 4-bit codes with one float32 scale per block, and dequantized inside the forward pass; only the
low-rank adapters on top are trained.

A kernel float[..., din, dout] ([in, out] layout, any leading stacked dims: [layers, ...], [experts, ...])
is cut into blocks of `block` consecutive rows along din, one block per output column; each block's scale
is its absmax, float32[..., din/block, dout] (1 for an all-zero block, whose codes then decode to exact
zeros). These are bitsandbytes' blocks of 64 consecutive values in torch's [out, in] layout. Because blocks
and nibble pairs run along din, a kernel sharded along din (whole blocks per shard) quantizes and
dequantizes locally: codes and scales shard like the kernel, and no collective is needed.

Formats (`KINDS`), with the bound on |w - dequantize(quantize(w))| as a fraction of the block's absmax
(`max_error`):
  int8  codes int8[..., din, dout] = round(127 w / absmax), in [-127, 127]; error <= 0.5/127.
  nf4   each value's nearest level of the 16-level NormalFloat4 codebook (QLoRA, Dettmers et al. 2023:
        quantiles of N(0, 1) normalized to [-1, 1], exact 0 and ±1 included), two 4-bit indices per byte:
        uint8[..., din/2, dout], row 2i in the low nibble and row 2i+1 in the high nibble of packed row i;
        error <= half the widest gap between levels (between -1 and the next level: ~0.152).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("int8", "nf4")
BLOCK = 64

# The NF4 levels as bitsandbytes ships them (`bitsandbytes.functional.get_4bit_type("nf4")`; QLoRA paper,
# Appendix E), in increasing order: index 7 is 0.
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)
_NF4_MIDPOINTS = (NF4[1:] + NF4[:-1]) / 2


def max_error(kind: str) -> float:
    """The bound on |w - dequantize(quantize(w))| per element, as a fraction of its block's absmax (up to
    float32 rounding, ~1e-7)."""
    _check_kind(kind)
    return 0.5 / 127 if kind == "int8" else float(np.diff(NF4).max()) / 2


def quantized_shapes(shape: tuple[int, ...], kind: str, block: int = BLOCK):
    """((codes shape, codes dtype), (scales shape, scales dtype)) of `quantize` on a kernel of `shape`
    [..., din, dout]. Raises ValueError where din is not a multiple of `block` (and of 2 for nf4)."""
    _check_kind(kind)
    shape = tuple(shape)
    if len(shape) < 2 or block < 1 or shape[-2] % block or (kind == "nf4" and shape[-2] % 2):
        raise ValueError(f"quantize {kind}: a kernel [..., din, dout] with din a multiple of the block {block}"
                         f"{' and of 2' if kind == 'nf4' else ''}, got shape {shape}")
    *lead, din, dout = shape
    codes = ((*lead, din, dout), jnp.int8) if kind == "int8" else ((*lead, din // 2, dout), jnp.uint8)
    return codes, ((*lead, din // block, dout), jnp.float32)


def quantize(w: jax.Array, kind: str, block: int = BLOCK) -> tuple[jax.Array, jax.Array]:
    """w float[..., din, dout] -> (codes, scales float32[..., din/block, dout]); codes int8[..., din, dout]
    (int8) or uint8[..., din/2, dout] (nf4, two rows per byte)."""
    quantized_shapes(w.shape, kind, block)
    *lead, din, dout = w.shape
    blocks = w.astype(jnp.float32).reshape(*lead, din // block, block, dout)
    absmax = jnp.abs(blocks).max(axis=-2)
    scales = jnp.where(absmax > 0, absmax, 1.0)
    x = (blocks / scales[..., None, :]).reshape(*lead, din, dout)  # in [-1, 1]: |w| <= absmax
    if kind == "int8":
        return jnp.round(x * 127).astype(jnp.int8), scales
    # The nearest level's index is the number of midpoints below x: 15 compares, elementwise (fused), no gather.
    index = sum((x > m).astype(jnp.uint8) for m in _NF4_MIDPOINTS).reshape(*lead, din // 2, 2, dout)
    return index[..., 0, :] | (index[..., 1, :] << 4), scales


def dequantize(codes: jax.Array, scales: jax.Array, kind: str, dtype) -> jax.Array:
    """`quantize`'s (codes, scales) -> float[..., din, dout] in `dtype` (computed in float32). The block
    size is din / scales.shape[-2]."""
    _check_kind(kind)
    if kind == "int8":
        values = codes.astype(jnp.float32)
    else:
        *lead, half, dout = codes.shape
        index = jnp.stack([codes & 0xF, codes >> 4], axis=-2).reshape(*lead, 2 * half, dout)
        values = _nf4_levels(index)
    *lead, din, dout = values.shape
    blocks = scales.shape[-2]
    if din % blocks:
        raise ValueError(f"dequantize {kind}: {din} rows of codes do not split into {blocks} blocks of scales")
    step = scales / 127 if kind == "int8" else scales
    out = values.reshape(*lead, blocks, din // blocks, dout) * step[..., None, :]
    return out.reshape(*lead, din, dout).astype(dtype)


def _nf4_levels(index: jax.Array) -> jax.Array:
    """NF4[index] for uint8 indices in [0, 16) as float32, by a tree of selects on the index's 4 bits:
    elementwise, so XLA fuses it with the unpacking and the scaling."""
    levels = list(NF4)
    for bit in range(4):
        chosen = ((index >> bit) & 1) == 1
        levels = [jnp.where(chosen, hi, lo) for lo, hi in zip(levels[::2], levels[1::2])]
    return levels[0]


def _check_kind(kind: str):
    if kind not in KINDS:
        raise ValueError(f"quantization kind {kind!r} is not one of {KINDS}")
