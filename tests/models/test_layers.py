"""Building blocks against transformers' own functions and closed forms."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from rdpo_jax import sharding
from rdpo_jax.models import config as config_lib
from rdpo_jax.models import layers

ROPES = {
    "default": dict(rope_type="default", rope_theta=10000.0),
    "linear": dict(rope_type="linear", rope_theta=500000.0, factor=4.0),
    "llama3": dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=8192),
    "yarn": dict(rope_type="yarn", rope_theta=1e6, factor=4.0, original_max_position_embeddings=32768),
    "yarn_mscale": dict(rope_type="yarn", rope_theta=1e4, factor=40.0, original_max_position_embeddings=4096,
                        mscale=1.0, mscale_all_dim=0.707, beta_fast=32, beta_slow=1),
}


@pytest.mark.parametrize("kind", sorted(ROPES))
def test_rope_frequencies_match_transformers(kind):
    hf = transformers.Qwen2Config(hidden_size=1024, num_attention_heads=8, max_position_embeddings=131072,
                                  rope_parameters=dict(ROPES[kind]))
    rope = dict(config_lib.rope_from_hf(hf))
    inv_freq, scale = layers.rope_inv_freq(128, rope)
    if kind == "default":  # not in transformers' table: the plain formula
        ref, ref_scale = 1.0 / (1e4 ** (np.arange(0, 128, 2) / 128)), 1.0
    else:
        ref, ref_scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf)
    np.testing.assert_allclose(inv_freq, np.asarray(ref), rtol=1e-6)
    assert scale == pytest.approx(ref_scale, rel=1e-6)


def test_rope_rotation_preserves_norm_and_relative_positions():
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.standard_normal((1, 6, 2, 16)), jnp.float32) for _ in range(2))
    inv_freq, _ = layers.rope_inv_freq(16, dict(rope_type="default", rope_theta=10000.0))
    pos = jnp.arange(6)[None]
    cos, sin = layers.rope_cos_sin(pos, inv_freq, 1.0, jnp.float32)
    qr, kr = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
    np.testing.assert_allclose(jnp.linalg.norm(qr, axis=-1), jnp.linalg.norm(q, axis=-1), rtol=1e-5)
    # <R(p)q, R(p')k> depends only on p - p': shifting both positions by 7 leaves the scores unchanged.
    cos7, sin7 = layers.rope_cos_sin(pos + 7, inv_freq, 1.0, jnp.float32)
    s0 = jnp.einsum("btnh,bsnh->bnts", qr, kr)
    s7 = jnp.einsum("btnh,bsnh->bnts", layers.apply_rope(q, cos7, sin7), layers.apply_rope(k, cos7, sin7))
    np.testing.assert_allclose(s0, s7, atol=1e-4)


def test_attention_masks_and_groups():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((2, 4, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, 4, 2, 8)), jnp.float32) for _ in range(2))
    mask = layers.causal_mask(jnp.array([[1, 1, 1, 1], [1, 1, 1, 0]]))
    out = layers.attention(q, k, v, mask, 8 ** -0.5)
    # reference: repeat kv heads (GQA), explicit softmax
    kk, vv = np.repeat(np.asarray(k), 2, axis=2), np.repeat(np.asarray(v), 2, axis=2)
    s = np.einsum("btnh,bsnh->bnts", np.asarray(q), kk) * 8 ** -0.5
    s = np.where(np.asarray(mask)[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(out, np.einsum("bnts,bsnh->btnh", p, vv), atol=1e-5)


def test_causal_attention_by_query_blocks_equals_one_dense_product(monkeypatch):
    """`causal=True` splits the queries into blocks, each against the keys up to its end (at most 6
    queries a block: 29 tokens in 5 blocks of 6, the last of 5): on multi-answer rows
    with padding and on the plain causal mask (mask None), values and gradients equal the dense product's
    on every token row."""
    import jax

    from rdpo_jax import logps

    length = 29
    branches = np.full((3, length), -1)
    branches[0, :length - 3] = np.repeat([0, 1, 2, 3], -(-(length - 3) // 4))[:length - 3]
    branches[1, :] = np.repeat([0, 1], -(-length // 2))[:length]
    branches[2, :5] = 0
    branches = jnp.asarray(branches)
    mask = logps.attention_mask(branches) & jnp.tril(jnp.ones((length, length), bool))
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((3, length, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((3, length, 2, 8)), jnp.float32) for _ in range(2))
    w = jnp.asarray(rng.standard_normal((3, length, 4, 8)), jnp.float32) * (branches >= 0)[..., None, None]

    @functools.partial(jax.jit, static_argnums=1)
    def value_and_grads(m, causal):
        return jax.value_and_grad(lambda q, k, v: jnp.sum(w * layers.attention(q, k, v, m, 0.3, "xla", causal=causal)),
                                  (0, 1, 2))(q, k, v)

    monkeypatch.setattr(layers, "QUERY_BLOCK", 6)
    for m, dense_mask in ((mask, mask), (None, layers.causal_mask(jnp.ones((3, length), jnp.int32)))):
        (a, ga), (b, gb) = value_and_grads(m, True), value_and_grads(dense_mask, False)
        np.testing.assert_allclose(a, b, rtol=1e-5)
        for x, y in zip(ga, gb):
            np.testing.assert_allclose(x, y, atol=1e-5)
    jaxpr = str(jax.make_jaxpr(lambda q: layers.attention(q, k, v, mask, 0.3, "xla", causal=True))(q))
    assert jaxpr.count("dot_general") == 2 * -(-length // 6)  # one QK and one PV per block


def test_fused_attention_call_equals_the_xla_path_on_branch_masks():
    """`jax.nn.dot_product_attention` as the cuDNN path calls it ("jax": the same call on XLA) equals the
    einsum path on a shared-prefix row and a multi-answer row with padding, values and gradients on the
    rows that attend (padding rows differ by design: they see themselves)."""
    import jax

    from rdpo_jax import logps

    branches = jnp.array([[0, 0, 0, 1, 1, 2, 2, 2, -1, -1], [0, 0, 1, 2, 2, 3, 3, 3, 3, -1]])
    mask = logps.attention_mask(branches)
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.standard_normal((2, 10, 6, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, 10, 3, 8)), jnp.float32) for _ in range(2))
    w = jnp.asarray(rng.standard_normal((2, 10, 6, 8)), jnp.float32) * (branches >= 0)[..., None, None]

    def loss(impl):
        return jax.value_and_grad(lambda q, k, v: jnp.sum(w * layers.attention(q, k, v, mask, 0.3, impl)), (0, 1, 2))

    (a, ga), (b, gb) = loss("xla")(q, k, v), loss("jax")(q, k, v)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    for x, y in zip(ga, gb):
        np.testing.assert_allclose(x, y, atol=1e-5)
    with pytest.raises(config_lib.UnsupportedConfigError, match="attention: 'flash'"):
        config_lib.RunSettings(attention="flash")
    xla = layers.attention(q, k, v, mask, 0.3, "xla")
    np.testing.assert_array_equal(layers.attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16),
                                                   v.astype(jnp.bfloat16), mask, 0.3),  # "auto" on CPU: xla
                                  layers.attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), mask, 0.3, "xla"))
    assert xla.dtype == jnp.float32


@pytest.mark.parametrize("family,impl", [("llava", "jax"), ("qwen2_5_vl", "jax"), ("llava", "splash"),
                                         ("qwen2_5_vl", "splash")])
def test_models_run_the_fused_attention_call_in_every_block(tiny_llava, tiny_qwen, family, impl, monkeypatch):
    """`RunSettings(attention="jax" | "splash")` reaches the decoder's and the vision tower's attention
    (Qwen: full and windowed blocks): the same logits as the einsum path."""
    from rdpo_jax.models import hf, splash
    from tests import tiny
    from tests import tiny_qwen as tq

    import jax

    folder = tiny_llava("siglip_qwen2")[0] if family == "llava" else tiny_qwen(False)[0]
    calls = []
    if impl == "jax":
        fused = jax.nn.dot_product_attention
        monkeypatch.setattr(jax.nn, "dot_product_attention",
                            lambda *a, **k: calls.append(k["implementation"]) or fused(*a, **k))
    else:
        kernel = splash.attention
        monkeypatch.setattr(splash, "attention", lambda *a: calls.append("splash") or kernel(*a))
    out = {}
    for run in ("xla", impl):
        model, cfg = hf.load_hf(folder, config_lib.RunSettings(attention=run))
        if family == "llava":
            batch = tiny.inputs("siglip_qwen2")
            out[run], valid = tiny.jax_logits(model, batch), batch["attention_mask"].astype(bool)
        else:
            batch = tq.inputs(tq.ROWS, seed=0)
            images, positions = tq.ours(batch, cfg.vision)
            out[run] = np.asarray(model(batch["input_ids"], images, batch["attention_mask"], positions))
            valid = batch["attention_mask"].astype(bool)
    vision = cfg.vision.depth if family == "qwen2_5_vl" else max(cfg.feature_layers)
    assert calls == [{"jax": "xla"}.get(impl, impl)] * (cfg.text.num_layers + vision)  # every block, once
    np.testing.assert_allclose(out[impl][valid], out["xla"][valid], atol=2e-5, rtol=0)


def test_unknown_activation_is_named():
    with pytest.raises(ValueError, match="activation 'swish2' is not supported"):
        layers.activation("swish2")


@pytest.mark.parametrize("V,chunk", [(37, 8), (40, 10), (40, 64)])
def test_chunked_head_equals_whole_logits_and_gradients(V, chunk):
    """37 = 5 chunks of 8 with 3 padding columns; 40 = 4 whole chunks; 64 ≥ V = one matmul."""
    import jax
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 5, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((16, V)) * 2, jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, (3, 5)), jnp.int32).at[0, :2].set(jnp.array([0, V - 1]))
    cot = jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)

    def whole(x, w):
        logits = x @ w
        return (jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0] * cot).sum()

    def chunked(x, w):
        return (layers.target_logps(x, w, targets, chunk) * cot).sum()

    ref = jax.nn.log_softmax(x @ w)
    got = jax.jit(layers.target_logps, static_argnums=3)(x, w, targets, chunk)
    np.testing.assert_allclose(got, np.take_along_axis(ref, targets[..., None], -1)[..., 0], atol=1e-5)
    for g, r in zip(jax.grad(chunked, (0, 1))(x, w), jax.grad(whole, (0, 1))(x, w)):
        np.testing.assert_allclose(g, r, atol=1e-4)  # sums of terms up to ~5: float32 rounding
    # no [.., V] float32 logits are saved for the backward pass: only [.., chunk] ones, recomputed per chunk
    def saved(f):  # shapes of what the backward pass keeps (the leaves of the VJP closure)
        return [leaf.shape for leaf in jax.tree.leaves(jax.vjp(f, x, w)[1])]

    def logits_like(shape):
        return len(shape) == 3 and shape[:2] == (3, 5) and shape[2] >= V

    assert any(map(logits_like, saved(whole)))  # the check sees whole logits where they are kept
    if chunk < V:
        assert not any(map(logits_like, saved(chunked))), saved(chunked)


def test_embedding_gradient_is_reduce_scattered_into_the_tables_shards():
    """The lookup gathers the table's width; its gradient (a scatter-add summed over the batch's devices)
    comes back in the table's FSDP shards without an all-reduce of the whole table, equal to the
    single-device gradient."""
    V, D, B, T = 64, 32, 8, 16
    mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    embed = layers.Embed(V, D, ("vocab", "embed"), param_dtype=jnp.float32, dtype=jnp.float32,
                         rngs=layers.InitKeys(jax.random.key(0)))
    ids = jax.random.randint(jax.random.key(1), (B, T), 0, V)
    graphdef, state = nnx.split(embed)

    def loss(state, ids):
        return (nnx.merge(graphdef, state)(ids) ** 2 * jnp.arange(D)).sum()

    spec = sharding.variable_spec(embed.embedding, dict(mesh.shape))
    assert spec == P(None, "fsdp")
    table = jax.tree.map(lambda _: NamedSharding(mesh, spec), state)
    grad = jax.jit(sharding.traced_on(mesh, jax.grad(loss)), in_shardings=(table, NamedSharding(mesh, P("fsdp"))),
                   out_shardings=table)
    text = grad.lower(state, ids).compile().as_text()
    assert not re.search(rf"f32\[{V},{D}\][^ ]* all-reduce\(", text), "the whole table's gradient is all-reduced"
    np.testing.assert_allclose(grad(state, ids)["embedding"][...], jax.grad(loss)(state, ids)["embedding"][...],
                               rtol=1e-6)
