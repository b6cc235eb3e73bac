"""Splash attention (Pallas' TPU kernel, interpret mode here) equals the einsum path on packed rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rdpo_jax import logps, sharding
from rdpo_jax.models import layers

# Two packed rows of 150 tokens (not a multiple of the kernel's 128-token blocks): a shared-prefix pair
# then a multi-answer group in the first; two segments of multi-answer groups and padding in the second.
BRANCHES = np.full((2, 150), -1, np.int32)
SEGMENTS = np.zeros((2, 150), np.int32)
BRANCHES[0, :] = [0] * 70 + [1] * 30 + [2] * 50
BRANCHES[1, :140] = [0] * 40 + [1] * 20 + [2] * 15 + [3] * 5 + [0] * 30 + [4] * 20 + [5] * 10
SEGMENTS[1, 80:140] = 1


def _inputs(heads, kv_heads, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((2, 150, heads, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, 150, kv_heads, 16)), jnp.float32) for _ in range(2))
    w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32) * (BRANCHES >= 0)[..., None, None]
    mask = logps.attention_mask(jnp.asarray(BRANCHES), jnp.asarray(SEGMENTS))
    return q, k, v, w, mask


def _value_and_grads(impl, q, k, v, w, mask):
    f = lambda q, k, v: jnp.sum(w * layers.attention(q, k, v, mask, 0.25, impl, causal=True))  # noqa: E731
    return jax.jit(jax.value_and_grad(f, (0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (2, 2)])
def test_splash_equals_xla_on_branch_and_segment_masks(heads, kv_heads):
    """Values and gradients (q, k, v) of splash = the einsum path on rows with answers sharing a prompt,
    segments and padding; grouped-query heads through the kernel's own grouping."""
    q, k, v, w, mask = _inputs(heads, kv_heads)
    (a, ga), (b, gb) = _value_and_grads("xla", q, k, v, w, mask), _value_and_grads("splash", q, k, v, w, mask)
    np.testing.assert_allclose(b, a, rtol=1e-5)
    for x, y in zip(gb, ga):
        np.testing.assert_allclose(x, y, atol=2e-5)
    out = layers.attention(q, k, v, mask, 0.25, "splash")
    valid = BRANCHES >= 0
    np.testing.assert_allclose(out[valid], layers.attention(q, k, v, mask, 0.25, "xla")[valid], atol=2e-6)
    # the mask matters: without it every query would see every key
    assert np.abs(np.asarray(out - layers.attention(q, k, v, None, 0.25, "splash")))[valid].max() > 0.1


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_splash_under_a_mesh_shards_rows_and_heads(kv_heads):
    """Under a (data 2, fsdp 2, tensor 2) mesh splash runs in a shard_map over the batch and, when the
    key/value heads divide the tensor axis, the heads too (else heads stay whole): same values and
    gradients as the einsum path on one device."""
    q, k, v, w, mask = _inputs(4, kv_heads, seed=1)
    q, k, v, w, mask = (jnp.concatenate([x, x[::-1]]) for x in (q, k, v, w, mask))  # 4 rows for 4 devices
    want = _value_and_grads("xla", q, k, v, w, mask)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with jax.set_mesh(mesh):
        got = _value_and_grads("splash", q, k, v, w, mask)
        lowered = jax.jit(lambda q, k, v: layers.attention(q, k, v, mask, 0.25, "splash")).lower(q, k, v)
    assert "shard_map" in lowered.as_text() or "manual" in lowered.as_text()
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for x, y in zip(got[1], want[1]):
        np.testing.assert_allclose(x, y, atol=2e-5)


def test_splash_refuses_cross_attention_and_auto_keeps_xla_off_tpu():
    q, k, v, w, mask = _inputs(2, 2)
    from rdpo_jax.models import splash
    with pytest.raises(ValueError, match="150 queries but 10 keys"):
        splash.attention(q, k[:, :10], v[:, :10], None, 0.25)
    # a KV-cache call (keys beyond the queries) runs the einsum path
    cache_mask = jnp.ones((2, 150, 160), bool)
    kk, vv = (jnp.pad(x, ((0, 0), (0, 10), (0, 0), (0, 0))) for x in (k, v))
    np.testing.assert_array_equal(layers.attention(q, kk, vv, cache_mask, 0.25, "splash"),
                                  layers.attention(q, kk, vv, cache_mask, 0.25, "xla"))
    assert jax.default_backend() == "cpu"
    np.testing.assert_array_equal(layers.attention(q, k, v, mask, 0.25), layers.attention(q, k, v, mask, 0.25, "xla"))
