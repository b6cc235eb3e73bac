"""Sharded loading, bf16 compute and rematerialization give the logits/gradients of the plain fp32 model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from rdpo_jax import sharding
from rdpo_jax.models import hf
from rdpo_jax.models.config import RunSettings
from tests import tiny


def test_fsdp_tensor_mesh_gives_same_logits_and_really_shards(tiny_llava):
    folder, _ = tiny_llava("clip_llama")
    single, _ = hf.load_hf(folder)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    model, _ = hf.load_hf(folder, mesh=mesh)

    attn = model.language_model.layers[0].self_attn
    q = attn.q_proj.kernel.get_value()  # [64, 8 heads · 8]
    assert q.sharding.spec == P("fsdp", "tensor")
    assert {s.data.shape for s in q.addressable_shards} == {(32, 16)}
    # 2 KV heads cannot be split over 4 tensor devices without cutting heads in half: replicated there.
    for kv in (attn.k_proj, attn.v_proj):
        assert kv.kernel.get_value().sharding.spec == P("fsdp", None)
    assert model.language_model.embed_tokens.embedding.get_value().sharding.spec == P("tensor", "fsdp")
    assert model.lm_head.kernel.get_value().sharding.spec == P("fsdp", "tensor")
    assert model.language_model.layers[1].mlp.down_proj.kernel.get_value().sharding.spec == P("tensor", "fsdp")
    assert model.language_model.norm.scale.get_value().sharding.spec == P(None)

    batch = tiny.inputs("clip_llama", batch=4)
    with jax.set_mesh(mesh):
        out = tiny.jax_logits(model, batch)
    ref = tiny.jax_logits(single, batch)
    assert tiny.max_diff_on_tokens(out, ref, batch["attention_mask"]) <= 1e-5


def test_bf16_compute_within_tolerance_of_fp32(tiny_llava):
    """bf16 params + bf16 compute (fp32 norms/softmax/logits): |Δlogit| ≤ 0.05·max|logit| on these weights."""
    folder, _ = tiny_llava("siglip_qwen3")
    fp32, _ = hf.load_hf(folder)
    bf16, _ = hf.load_hf(folder, RunSettings(param_dtype=jnp.bfloat16))
    assert bf16.run.dtype == jnp.bfloat16
    assert bf16.language_model.layers[0].mlp.up_proj.kernel.get_value().dtype == jnp.bfloat16
    batch = tiny.inputs("siglip_qwen3")
    ref, out = tiny.jax_logits(fp32, batch), tiny.jax_logits(bf16, batch)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    scale = np.abs(ref).max()
    diff = tiny.max_diff_on_tokens(out, ref, batch["attention_mask"])
    assert 0 < diff <= 0.05 * scale, (diff, scale)


@pytest.mark.parametrize("policy", ["full", "dots_saveable"])
def test_remat_gives_same_gradients(tiny_llava, policy):
    folder, _ = tiny_llava("siglip_qwen2")
    batch = tiny.inputs("siglip_qwen2", batch=2)
    args = [jnp.asarray(batch[k]) for k in ("input_ids", "pixel_values", "attention_mask")]

    def grads(remat):
        graphdef, params = nnx.split(hf.load_hf(folder, RunSettings(remat=remat))[0])

        def loss(params, ids, px, mask):
            logits = nnx.merge(graphdef, params)(ids, px, mask)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 7])

        jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params, *args))
        return jax.tree.leaves(jax.jit(jax.grad(loss))(params, *args)), "remat" in jaxpr

    plain, plain_has_remat = grads("none")
    remat, has_remat = grads(policy)
    assert has_remat and not plain_has_remat
    for a, b in zip(plain, remat):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
