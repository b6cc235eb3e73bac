"""Generation: greedy equals transformers' generate token for token; sampling is reproducible; filters,
stop tokens and several samples per prompt behave."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from rdpo_jax import sampling, sharding
from rdpo_jax.models import hf
from tests import tiny


def _prompts(cfg, seed=0):
    rng = np.random.default_rng(seed)
    F = cfg.image_seq_len
    prompts = [[7] + [tiny.IMAGE_TOKEN] * F + list(rng.integers(6, tiny.VOCAB, 3)),
               [8, 9] + [tiny.IMAGE_TOKEN] * F + list(rng.integers(6, tiny.VOCAB, 7))]  # different lengths
    ids, mask = sampling.left_pad(prompts, pad_id=0)
    size = cfg.vision.image_size
    return ids, mask, rng.standard_normal((2, size, size, 3)).astype(np.float32)


@pytest.mark.parametrize("name", ["siglip_qwen2", "clip_llama", "siglip_qwen3"])
def test_greedy_matches_transformers_generate(tiny_llava, name):
    folder, torch_model = tiny_llava(name)
    model, cfg = hf.load_hf(folder)
    ids, mask, pixels = _prompts(cfg)
    sc = sampling.SamplingConfig(max_new_tokens=12, temperature=0.0)
    tokens, lengths = sampling.generate(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels),
                                        jax.random.key(0), sc)
    px = torch.tensor(pixels.transpose(0, 3, 1, 2))
    with torch.no_grad():
        ref = torch_model.generate(input_ids=torch.tensor(ids, dtype=torch.long), pixel_values=px,
                                   attention_mask=torch.tensor(mask, dtype=torch.long), max_new_tokens=12,
                                   do_sample=False, eos_token_id=None, pad_token_id=0)
    np.testing.assert_array_equal(np.asarray(tokens), ref[:, ids.shape[1]:].numpy())
    assert np.asarray(lengths).tolist() == [12, 12]


def test_sampling_is_reproducible_and_sharded_equals_single(tiny_llava):
    folder, _ = tiny_llava("siglip_qwen2")
    model, cfg = hf.load_hf(folder)
    ids, mask, pixels = _prompts(cfg, 1)
    sc = sampling.SamplingConfig(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.9, num_samples=4)
    args = (jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels))
    a, _ = sampling.generate(model, *args, jax.random.key(3), sc)
    b, _ = sampling.generate(model, *args, jax.random.key(3), sc)
    c, _ = sampling.generate(model, *args, jax.random.key(4), sc)
    assert a.shape == (8, 10)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len({tuple(r) for r in np.asarray(a)[:4]}) > 1  # the 4 samples of one prompt differ
    mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 4})  # prompts over data, heads over tensor
    sharded_model, _ = hf.load_hf(folder, mesh=mesh)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    with jax.set_mesh(mesh):
        d, _ = sampling.generate(sharded_model, *jax.device_put(args, rows), jax.random.key(3), sc)
    np.testing.assert_array_equal(a, d)


def test_stop_tokens_end_rows_and_pad_the_rest(tiny_llava):
    folder, _ = tiny_llava("siglip_qwen2")
    model, cfg = hf.load_hf(folder)
    ids, mask, pixels = _prompts(cfg)
    args = (model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels), jax.random.key(0))
    free, _ = sampling.generate(*args, sampling.SamplingConfig(max_new_tokens=8, temperature=0.0))
    stop = int(free[0, 2])  # greedy row 0 emits this at step 2: make it a stop token
    tokens, lengths = sampling.generate(*args, sampling.SamplingConfig(max_new_tokens=8, temperature=0.0,
                                                                       stop_ids=(stop,), pad_id=-1))
    tokens = np.asarray(tokens)
    first = int(np.argmax(np.asarray(free[0]) == stop))
    assert int(lengths[0]) == first + 1
    np.testing.assert_array_equal(tokens[0, :first + 1], np.asarray(free)[0, :first + 1])
    assert np.all(tokens[0, first + 1:] == -1)


def test_filters_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 20)).astype(np.float32)
    out = np.asarray(sampling.filter_logits(jnp.asarray(logits), sampling.SamplingConfig(1, temperature=0.5, top_k=5)))
    for row, orig in zip(out, logits):
        kept = np.isfinite(row)
        assert kept.sum() == 5 and set(np.flatnonzero(kept)) == set(np.argsort(-orig)[:5])
        np.testing.assert_allclose(row[kept], orig[kept] / 0.5, rtol=1e-6)
    out = np.asarray(sampling.filter_logits(jnp.asarray(logits), sampling.SamplingConfig(1, top_p=0.6)))
    for row, orig in zip(out, logits):
        p = np.exp(orig - orig.max())
        p /= p.sum()
        order = np.argsort(-p)
        n = int(np.searchsorted(np.cumsum(p[order]), 0.6) + 1)  # smallest set with mass ≥ 0.6
        assert set(np.flatnonzero(np.isfinite(row))) == set(order[:n])
