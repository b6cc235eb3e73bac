"""Self-attention through Pallas' TPU splash attention kernel, with the layout's own mask as a block mask.

Packed rows (shared-prefix pairs, multi-answer rows, several segments per row) mask attention by data:
an answer sees its prompt and itself, not the answers beside it. That is not one set of splash segment
ids, so the kernel gets the row's boolean mask itself, as a dynamic mask: splash tiles it into blocks,
skips the blocks with nothing to attend to (the upper triangle, other answers, other segments) and
applies the mixed ones inside the kernel, so float32 logits [N, T, S] never exist. One kernel call per
row (vmapped), grouped-query heads as the kernel's own MHA grouping, and under a mesh one `shard_map`
over the batch (and, when both query and key/value heads divide it, the tensor) axes, since XLA cannot
partition a Pallas call.

The platform is the target's (the traced mesh's devices, `sharding.target_platform`), not the host's:
compiled ahead of time for TPU chips on a CPU host, the program holds the Mosaic kernel. Off TPU the
kernel runs in Pallas' interpret mode: slow, but the same program, which is how the tests on
CPU prove it equal to the einsum path (values and gradients).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.sharding import PartitionSpec

from rdpo_jax import sharding

LANES = 128  # sequence lengths are padded to a multiple of this (the kernel's smallest block)


def _block(length: int) -> int:
    return next(b for b in (512, 256, LANES) if length % b == 0)


def _row_kernel(mask: jax.Array, block: int, interpret: bool):
    """The splash kernel of one row's mask bool[T, T] (one mask for every head)."""
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                              block_kv_dq=block)
    kernel = splash.make_splash_mha(mask[None], block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                    interpret=interpret)
    # A dynamic mask's MaskInfo carries the Python flag `is_dynamic_mask`, which making the kernel under a
    # trace turns into an array that the kernel then tests as a bool; it only names the scope, so drop it.
    for name in ("fwd_mask_info", "dq_mask_info", "dkv_mask_info"):
        info = getattr(kernel, name)
        if info is not None:
            setattr(kernel, name, info._replace(is_dynamic_mask=None))
    return kernel


def _local(q, k, v, mask, interpret):
    """Splash attention of the rows this device holds: q [B, T, N, H], k/v [B, T, K, H], mask [B, T, T]."""
    T = q.shape[1]
    block = _block(T)

    def row(q, k, v, mask):
        kernel = _row_kernel(mask, block, interpret)
        out = kernel(q.swapaxes(0, 1), k.swapaxes(0, 1), v.swapaxes(0, 1))  # the kernel is head-major
        return out.swapaxes(0, 1)

    return jax.vmap(row)(q, k, v, mask)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float) -> jax.Array:
    """Self-attention (keys at the queries' positions) through splash: q float[B, T, N, H], k/v
    float[B, T, K, H], mask bool[B, T, T] (True = may attend) or None (full). Returns float[B, T, N, H].

    Rows are padded to a multiple of 128; every query also sees itself, so a padding row averages its own
    value instead of dividing by zero (callers ignore padding rows, as on the other paths).
    """
    B, T, N, H = q.shape
    if k.shape[1] != T:
        raise ValueError(f"splash attention is self-attention: {T} queries but {k.shape[1]} keys")
    mask = jnp.ones((B, T, T), bool) if mask is None else mask
    pad = -T % LANES
    eye = jnp.eye(T + pad, dtype=bool)
    mask = jnp.pad(mask, ((0, 0), (0, pad), (0, pad))) | eye
    q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in ((q * scale).astype(q.dtype), k, v))
    interpret = sharding.target_platform() != "tpu"
    run = lambda q, k, v, mask: _local(q, k, v, mask, interpret)  # noqa: E731
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and set(sharding.MESH_AXES) <= set(mesh.axis_names):
        sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
        q_spec = sharding.logical_to_spec(("batch", None, "act_heads", None), q.shape, sizes)
        kv_spec = sharding.logical_to_spec(("batch", None, "act_heads", None), k.shape, sizes)
        if kv_spec[2] is None:  # heads split only where each device keeps whole groups of query heads
            q_spec = PartitionSpec(q_spec[0], None, None, None)
        mask_spec = PartitionSpec(q_spec[0], None, None)
        run = jax.shard_map(run, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, mask_spec), out_specs=q_spec,
                            check_vma=False)
    return run(q, k, v, mask)[:, :T]
