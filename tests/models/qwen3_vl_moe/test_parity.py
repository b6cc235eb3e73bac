"""Qwen3-VL-MoE equals transformers' `Qwen3VLMoeForConditionalGeneration` (fp32, eager): the routers pick
the same experts (checked first, on the same inputs, with router weights large enough that no token's
top-k is a near tie) and the blocks give the same outputs; logits within 1e-4 with a dense layer among
sparse ones (looped) and every layer sparse (scanned); the load-balancing loss equals transformers'
`aux_loss` with padding excluded; greedy decoding equals `generate`; transformers 5's saved expert layout
is read and the Hub's written, which `from_pretrained` loads with no missing keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from rdpo_jax.models import config as config_lib
from rdpo_jax.models import hf, moe, safetensors_io
from tests import tiny_qwen as tq

ATOL = 1e-4


def _forward(model):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, ids, images, mask, pos: nnx.merge(graphdef, s)(ids, images, mask, pos)), state


def test_routers_choose_the_experts_transformers_chooses(tiny_qwen3_moe):
    """Every sparse block, fed the hidden states transformers feeds it: the same top-k experts for every
    token (no near ties: the k-th and next router logits differ by > 1e-3), the same block output."""
    folder, theirs = tiny_qwen3_moe("mixed")
    model, cfg = hf.load_hf(folder)
    assert cfg.text.moe.layers == (1, 2) and not model.language_model.layers[0].sparse
    seen = {}
    hooks = [theirs.model.language_model.layers[i].mlp.register_forward_hook(
        lambda mod, args, out, i=i: seen.__setitem__(i, (args[0].numpy(), out.numpy()))) for i in cfg.text.moe.layers]
    batch = tq.inputs()
    try:
        tq.torch_logits(theirs, batch)
    finally:
        for h in hooks:
            h.remove()
    for i in cfg.text.moe.layers:
        x, want = seen[i]
        router = theirs.model.language_model.layers[i].mlp.gate
        with torch.no_grad():
            _, _, their_chosen = router(torch.tensor(x))
        got, (probs, chosen) = model.language_model.layers[i].mlp(jnp.asarray(x))
        ranked = np.log(np.sort(np.asarray(probs), axis=-1)[:, ::-1])
        assert (ranked[:, 1] - ranked[:, 2]).min() > 1e-3  # top-2 of 4: no near ties (in logits)
        np.testing.assert_array_equal(np.sort(np.asarray(chosen), -1), np.sort(their_chosen.numpy(), -1))
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind, scan", [("mixed", "off"), ("sparse", "on")], ids=["mixed-looped", "sparse-scanned"])
def test_logits_equal_transformers(tiny_qwen3_moe, kind, scan):
    folder, theirs = tiny_qwen3_moe(kind)
    model, cfg = hf.load_hf(folder, run=config_lib.RunSettings(scan_layers=scan))
    assert type(model).__name__ == "Qwen3VLMoe" and cfg.tie_word_embeddings == (kind == "sparse")
    forward, state = _forward(model)
    for seed, rows in enumerate([tq.ROWS, [([4, (1, 12, 4), 3], "left"), ([9], "left")]]):
        batch = tq.inputs(rows, seed=seed)
        images, positions = tq.ours(batch, cfg.vision)
        got = np.asarray(forward(state, batch["input_ids"], images, batch["attention_mask"], positions))
        valid = batch["attention_mask"].astype(bool)
        np.testing.assert_allclose(got[valid], tq.torch_logits(theirs, batch)[valid], rtol=0, atol=ATOL)


@pytest.mark.parametrize("scan", ["off", "on"])
def test_load_balancing_loss_equals_transformers(tiny_qwen3_moe, scan):
    """The routers' statistics a forward sows (`record_router`), summed, give transformers' `aux_loss` for the
    same rows and padding mask (padding tokens excluded); a forward without `record_router` sows nothing."""
    folder, theirs = tiny_qwen3_moe("sparse")
    model, cfg = hf.load_hf(folder, run=config_lib.RunSettings(scan_layers=scan))
    batch = tq.inputs()
    images, positions = tq.ours(batch, cfg.vision)
    model(batch["input_ids"], images, batch["attention_mask"], positions)
    assert not nnx.state(model, nnx.Intermediate)
    model.set_attributes(record_router=True)
    model(batch["input_ids"], images, batch["attention_mask"], positions)
    stats = sum(jax.tree.leaves(nnx.pop(model, nnx.Intermediate)))
    ids = torch.tensor(batch["input_ids"], dtype=torch.long)
    with torch.no_grad():
        out = theirs(input_ids=ids, attention_mask=torch.tensor(batch["attention_mask"], dtype=torch.long),
                     pixel_values=torch.tensor(np.concatenate([p for r in batch["patches"] for p in r])),
                     image_grid_thw=torch.tensor([g for r in batch["grids"] for g in r]),
                     mm_token_type_ids=(ids == tq.IMAGE).long(), output_router_logits=True)
    assert float(stats[2, 0]) == batch["attention_mask"].sum() * len(cfg.text.moe.layers)
    assert float(stats[0].sum()) == float(stats[2, 0]) * cfg.text.moe.top_k
    np.testing.assert_allclose(float(moe.aux_loss(stats)), float(out.aux_loss), rtol=1e-5)


def test_greedy_matches_transformers_generate(tiny_qwen3_moe):
    folder, theirs = tiny_qwen3_moe("sparse")
    model, cfg = hf.load_hf(folder, run=config_lib.RunSettings(scan_layers="on"))
    tq.check_greedy(model, cfg, theirs)


def test_reads_transformers5_experts_writes_the_hubs(tiny_qwen3_moe, tmp_path):
    """transformers 5 saves experts [E, out, in]; `save_hf` writes the Hub's [E, in, out], which
    `from_pretrained` loads (transposing by shape) to the same logits, no key missing."""
    folder, theirs = tiny_qwen3_moe("mixed")
    name = "model.language_model.layers.1.mlp.experts.gate_up_proj"
    assert safetensors_io.Reader(folder).shape(name) == (4, 48, 64)
    model, _ = hf.load_hf(folder)
    hf.save_hf(model, str(tmp_path), folder)
    assert safetensors_io.Reader(str(tmp_path)).shape(name) == (4, 64, 48)
    again, _ = hf.load_hf(str(tmp_path))  # the Hub layout reads as well
    np.testing.assert_array_equal(np.asarray(again.language_model.layers[1].mlp.experts.gate_up_proj[...]),
                                  np.asarray(model.language_model.layers[1].mlp.experts.gate_up_proj[...]))
    reloaded, info = transformers.Qwen3VLMoeForConditionalGeneration.from_pretrained(
        str(tmp_path), output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    batch = tq.inputs()
    valid = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(tq.torch_logits(reloaded.eval(), batch)[valid], tq.torch_logits(theirs, batch)[valid],
                               rtol=0, atol=1e-6)
