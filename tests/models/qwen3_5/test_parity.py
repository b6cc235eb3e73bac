"""Qwen3.5 equals transformers' `Qwen3_5ForConditionalGeneration` (fp32, eager attention, transformers' torch
DeltaNet kernels; ≤ 1e-4 on logits): rows with one to three images of different sizes, a text-only row, left
and right padding, tied and untied heads, layers looped and scanned (blocks of [DeltaNet, attention]); a
shared-prefix row equals two separate forwards; greedy decoding (the DeltaNet layers' conv tail and state in
the cache) equals `generate`; `save_hf` → `from_pretrained` with no missing or unexpected keys, the Hub's
`mtp.*` tensors skipped on load; sharded equals one device."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rdpo_jax.models import config as config_lib
from rdpo_jax.models import hf, safetensors_io
from rdpo_jax.models.qwen3_5 import text
from tests import tiny_qwen as tq

ATOL = 1e-4


@pytest.mark.parametrize("tied, scan", [(False, "off"), (True, "on")], ids=["untied-looped", "tied-scanned"])
def test_logits_equal_transformers(tiny_qwen35, tied, scan):
    folder, theirs = tiny_qwen35(tied)
    model, cfg = hf.load_hf(folder, run=config_lib.RunSettings(scan_layers=scan))
    assert cfg.text.layer_types == ("linear_attention", "full_attention") * 2 and cfg.text.rotary_dim == 8
    assert model.language_model.block == (2 if scan == "on" else 1)  # scanned: blocks of [DeltaNet, attention]
    forward, state = tq.forward(model)
    batch = tq.inputs(tq.ROWS)
    images, positions = tq.ours(batch, cfg.vision)
    got = np.asarray(forward(state, batch["input_ids"], images, batch["attention_mask"], positions))
    expected = tq.torch_logits(theirs, batch)
    valid = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(got[valid], expected[valid], rtol=0, atol=ATOL)


def test_shared_prefix_row_equals_two_transformers_forwards(tiny_qwen35):
    """The rejected answer starts from the prompt's DeltaNet state and conv window, not the chosen answer's
    (transformers' own 4D-mask forward of this row is off by up to 0.17: it is not the oracle)."""
    folder, theirs = tiny_qwen35(False)
    model, cfg = hf.load_hf(folder)
    tq.check_shared_prefix_row(model, cfg, theirs, ATOL)


@pytest.mark.parametrize("scan", ["off", "on"])
def test_greedy_matches_transformers_generate(tiny_qwen35, scan):
    """Left-padded prompts prefilled (chunked rule) into a cache of attention keys/values and DeltaNet conv
    tails and states, then decoded one token at a time (the recurrent rule)."""
    folder, theirs = tiny_qwen35(False)
    model, cfg = hf.load_hf(folder, run=config_lib.RunSettings(scan_layers=scan))
    tq.check_greedy(model, cfg, theirs)


def test_save_hf_loads_in_transformers_with_same_logits(tiny_qwen35, tmp_path):
    folder, theirs = tiny_qwen35(False)
    model, _ = hf.load_hf(folder, run=config_lib.RunSettings(scan_layers="on"))
    hf.save_hf(model, str(tmp_path), folder)
    assert set(safetensors_io.Reader(str(tmp_path)).keys()) == set(safetensors_io.Reader(folder).keys())
    assert json.load(open(tmp_path / "config.json"))["architectures"] == ["Qwen3_5ForConditionalGeneration"]
    tq.check_reload(str(tmp_path), theirs, "Qwen3_5ForConditionalGeneration")


def test_hub_files_multi_token_prediction_layer_is_skipped(tiny_qwen35, tmp_path):
    """A Hub folder also holds `mtp.*` (one multi-token-prediction layer): read past, not an error."""
    folder, _ = tiny_qwen35(False)
    reader = safetensors_io.Reader(folder)
    specs = [safetensors_io.TensorSpec(k, reader.get(k).dtype, reader.shape(k), lambda k=k: reader.get(k))
             for k in reader.keys()]
    mtp = np.ones((64, 96), np.float32)
    specs.append(safetensors_io.TensorSpec("mtp.layers.0.mlp.down_proj.weight", mtp.dtype, mtp.shape, lambda: mtp))
    safetensors_io.write(str(tmp_path), specs)
    with open(os.path.join(folder, "config.json")) as src, open(tmp_path / "config.json", "w") as dst:
        dst.write(src.read())
    model, _ = hf.load_hf(str(tmp_path))
    assert "mtp" not in json.dumps([str(p) for p, _ in nnx.to_flat_state(nnx.state(model))])


@pytest.mark.parametrize("edit, field", [
    (lambda c: c["text_config"].update(linear_num_value_heads=3), "text_config.linear_num_value_heads"),
    (lambda c: c["text_config"]["rope_parameters"].update(mrope_section=[4, 2, 2]),
     "text_config.rope_parameters.mrope_section"),
    (lambda c: c["vision_config"].update(deepstack_visual_indexes=[0]), "vision_config.deepstack_visual_indexes"),
])
def test_unsupported_config_is_named(tiny_qwen35, tmp_path, edit, field):
    folder, _ = tiny_qwen35(False)
    tq.check_config_error(folder, tmp_path, edit, field)


def test_layer_pattern_and_scanned_names():
    """The scan's body is the pattern's period; stacked blocks name their layers i·p + j on disk."""
    assert text.period(("linear_attention",) * 3 + ("full_attention",)) == 4
    assert text.period(("linear_attention", "full_attention") * 3) == 2
    assert text.period(("linear_attention", "linear_attention", "full_attention", "linear_attention")) == 4


def test_sharded_equals_single_device(tiny_qwen35, capfd):
    """On an (fsdp 2, expert 2, tensor 2) mesh = one device, in float64 (float32: 1e-4 apart by the order of
    sums alone)."""
    tq.check_sharded_float64(tiny_qwen35(False)[0], capfd)


def test_samples_of_a_prompt_continue_from_copies_of_its_state(tiny_qwen35):
    """n samples per prompt: one prefill, its DeltaNet conv tails and states copied to the n rows (scanned,
    stacked per block): at temperature 0 each row decodes what the prompt alone does."""
    import jax.numpy as jnp

    from rdpo_jax import sampling

    folder, _ = tiny_qwen35(False)
    model, _ = hf.load_hf(folder, run=config_lib.RunSettings(scan_layers="on"))
    rng = np.random.default_rng(5)
    ids, mask = sampling.left_pad([rng.integers(0, tq.IMAGE, n).tolist() for n in (9, 4)], 0)
    one, _ = sampling.generate(model, jnp.asarray(ids), jnp.asarray(mask), None, jax.random.key(0),
                               sampling.SamplingConfig(max_new_tokens=6, temperature=0.0))
    three, _ = sampling.generate(model, jnp.asarray(ids), jnp.asarray(mask), None, jax.random.key(0),
                                 sampling.SamplingConfig(max_new_tokens=6, temperature=0.0, num_samples=3))
    np.testing.assert_array_equal(np.asarray(three), np.repeat(np.asarray(one), 3, axis=0))


def test_bfloat16_export_keeps_the_deltanet_float32_parameters(tiny_qwen35, tmp_path):
    """A bfloat16 model computes g from float32 `A_log`, `dt_bias` and output-norm weights, and writes them
    in float32 as the Hub's files hold them; the rest in bfloat16."""
    folder, _ = tiny_qwen35(False)
    model, _ = hf.load_hf(folder, run=config_lib.RunSettings(param_dtype=jnp.bfloat16, scan_layers="on"))
    hf.save_hf(model, str(tmp_path), folder)
    reader, source = safetensors_io.Reader(str(tmp_path)), safetensors_io.Reader(folder)
    kept = {k for k in reader.keys() if reader.get(k).dtype == np.float32}
    assert kept == {f"model.language_model.layers.{i}.linear_attn.{leaf}" for i in (0, 2)
                    for leaf in ("A_log", "dt_bias", "norm.weight")}
    for k in kept:
        np.testing.assert_array_equal(reader.get(k), source.get(k))  # not rounded on the way


def test_remat_per_layer_inside_scanned_blocks_gives_the_same_gradients(tiny_qwen35):
    """Rematerialized layer by layer inside each scanned block: the parameters' gradients equal those of
    the model that keeps every residual, in float64 (3e-16 of each weight's largest; float32's reordered
    sums give up to 3e-5) on text rows (the tower's remat is Qwen3-VL's)."""
    folder, _ = tiny_qwen35(False)
    batch = tq.inputs([([17], "right"), ([11], "left")], length=24)
    grads = {}
    with jax.enable_x64(True):
        for remat in ("none", "full"):
            run = config_lib.RunSettings(scan_layers="on", remat=remat, param_dtype=jnp.float64)
            graphdef, state = nnx.split(hf.load_hf(folder, run=run)[0])

            def loss(state, ids, mask):
                logits = nnx.merge(graphdef, state)(ids, None, mask)
                return jnp.sum(jnp.where(mask[..., None] > 0, jax.nn.log_softmax(logits), 0))

            args = (state, batch["input_ids"], batch["attention_mask"])
            jaxpr = str(jax.make_jaxpr(jax.grad(loss))(*args))
            assert ("remat" in jaxpr or "checkpoint" in jaxpr) == (remat != "none")
            grad = jax.jit(jax.grad(loss))(*args)
            grads[remat] = {"/".join(map(str, p)): np.asarray(g) for p, g in nnx.to_flat_state(grad)}
    decoder = [g for p, g in grads["none"].items() if not p.startswith("visual")]
    assert len(decoder) == 28 and all(np.abs(g).sum() > 0 for g in decoder)  # every decoder weight learns
    for a, b in zip(grads["full"].values(), grads["none"].values()):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12 * np.abs(b).max())
