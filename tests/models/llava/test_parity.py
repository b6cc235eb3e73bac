"""fp32 logits of our LLaVA equal transformers' PyTorch LlavaForConditionalGeneration (≤ 1e-4)."""

import jax.numpy as jnp
import numpy as np
import pytest

from rdpo_jax.models import hf
from tests import tiny

TOL = 1e-4


@pytest.mark.parametrize("name", sorted(tiny.CONFIGS))
def test_logits_match_transformers(tiny_llava, name):
    folder, torch_model = tiny_llava(name)
    model, cfg = hf.load_hf(folder)
    batch = tiny.inputs(name)
    ref = tiny.torch_logits(torch_model, batch)
    out = tiny.jax_logits(model, batch)
    assert out.shape == ref.shape == (3, 40, tiny.VOCAB)
    assert out.dtype == np.float32
    assert np.abs(ref).max() > 0.5, "weights too small for a meaningful comparison"
    assert tiny.max_diff_on_tokens(out, ref, batch["attention_mask"]) <= TOL


def test_several_images_per_row(tiny_llava):
    name = "clip_llama"
    folder, torch_model = tiny_llava(name)
    model, _ = hf.load_hf(folder)
    batch = tiny.inputs(name, batch=2, length=48, images_per_row=2)
    assert batch["pixel_values"].shape[:2] == (2, 2)
    ref = tiny.torch_logits(torch_model, batch)
    out = tiny.jax_logits(model, batch)
    assert tiny.max_diff_on_tokens(out, ref, batch["attention_mask"]) <= TOL


def test_eager_call_matches_jit(tiny_llava):
    folder, _ = tiny_llava("siglip_qwen2")
    model, _ = hf.load_hf(folder)
    batch = tiny.inputs("siglip_qwen2", batch=1)
    eager = np.asarray(model(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["pixel_values"])))
    np.testing.assert_allclose(eager, tiny.jax_logits(model, batch), atol=1e-5)
