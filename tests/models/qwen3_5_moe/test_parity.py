"""Qwen3.5-MoE equals transformers' `Qwen3_5MoeForConditionalGeneration` (fp32, eager attention): logits with
layers looped and scanned, read from the per-expert tensors transformers 5.23 saves; a shared-prefix row equals
two separate forwards; greedy decoding equals `generate`; `save_hf` writes the Hub's stacked [E, out, in]
experts, which `from_pretrained` loads with no missing or unexpected keys to the same logits (and we read back
exactly); sharded equals one device.
"""

import os
import shutil

import jax
import numpy as np
import pytest
import safetensors.numpy
import transformers
from flax import nnx

from rdpo_jax.models import config as config_lib
from rdpo_jax.models import hf, safetensors_io
from tests import tiny_qwen as tq

ATOL = 1e-4
EXPERTS = "model.language_model.layers.{}.mlp.experts."


def _logits(model, cfg, batch):
    images, positions = tq.ours(batch, cfg.vision)
    forward, state = tq.forward(model)
    return np.asarray(forward(state, batch["input_ids"], images, batch["attention_mask"], positions))


@pytest.fixture(scope="module")
def scanned(tiny_qwen35_moe):
    """(model, cfg, its logits on `tq.inputs()`), layers scanned."""
    model, cfg = hf.load_hf(tiny_qwen35_moe[0], run=config_lib.RunSettings(scan_layers="on"))
    return model, cfg, _logits(model, cfg, tq.inputs())


@pytest.fixture(scope="module")
def theirs_logits(tiny_qwen35_moe):
    return tq.torch_logits(tiny_qwen35_moe[1], tq.inputs())


@pytest.mark.parametrize("scan", ["off", "on"], ids=["looped", "scanned"])
def test_logits_equal_transformers(tiny_qwen35_moe, scanned, theirs_logits, scan):
    """The folder transformers saved holds its experts per expert; read, they give transformers' logits."""
    folder, _ = tiny_qwen35_moe
    names = safetensors_io.Reader(folder).keys()
    assert EXPERTS.format(0) + "3.gate_proj.weight" in names and EXPERTS.format(0) + "gate_up_proj" not in names
    if scan == "on":
        model, cfg, got = scanned
    else:
        model, cfg = hf.load_hf(folder, run=config_lib.RunSettings(scan_layers="off"))
        got = _logits(model, cfg, tq.inputs())
    assert type(model).__name__ == "Qwen35Moe" and cfg.text.moe.layers == (0, 1, 2, 3)
    assert cfg.text.moe.shared_intermediate_size == 24
    valid = tq.inputs()["attention_mask"].astype(bool)
    np.testing.assert_allclose(got[valid], theirs_logits[valid], rtol=0, atol=ATOL)


def test_shared_prefix_row_equals_separate_forwards(tiny_qwen35_moe, scanned):
    model, cfg, _ = scanned
    tq.check_shared_prefix_row(model, cfg, tiny_qwen35_moe[1], atol=ATOL)


def test_greedy_matches_transformers_generate(tiny_qwen35_moe, scanned):
    model, cfg, _ = scanned
    tq.check_greedy(model, cfg, tiny_qwen35_moe[1])


def test_writes_the_hubs_stacked_experts(tiny_qwen35_moe, scanned, theirs_logits, tmp_path):
    """`save_hf` writes gate_up [E, 2I, D] (gate rows first) and down [E, D, I], slices of transformers'
    per-expert tensors; transformers loads the folder with nothing missing, unexpected or misshapen, to
    the same logits; we read it back exactly."""
    folder, _ = tiny_qwen35_moe
    model, _, _ = scanned
    hf.save_hf(model, str(tmp_path), folder)
    theirs, ours = safetensors_io.Reader(folder), safetensors_io.Reader(str(tmp_path))
    for layer in range(4):
        gate_up, down = (ours.get(EXPERTS.format(layer) + leaf) for leaf in ("gate_up_proj", "down_proj"))
        assert gate_up.shape == (4, 48, 64) and down.shape == (4, 64, 24)
        for e in range(4):
            part = lambda name: theirs.get(EXPERTS.format(layer) + f"{e}.{name}.weight")  # noqa: E731
            np.testing.assert_array_equal(gate_up[e], np.concatenate([part("gate_proj"), part("up_proj")]))
            np.testing.assert_array_equal(down[e], part("down_proj"))
    reloaded, info = transformers.Qwen3_5MoeForConditionalGeneration.from_pretrained(
        str(tmp_path), output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    valid = tq.inputs()["attention_mask"].astype(bool)
    np.testing.assert_allclose(tq.torch_logits(reloaded.eval(), tq.inputs())[valid], theirs_logits[valid],
                               rtol=0, atol=1e-6)
    again, _ = hf.load_hf(str(tmp_path), run=config_lib.RunSettings(scan_layers="on"))
    jax.tree.map(np.testing.assert_array_equal, nnx.state(again, nnx.Param), nnx.state(model, nnx.Param))


def test_per_expert_slices_read_lazily(tiny_qwen35_moe):
    """What a multi-host load asks of per-expert tensors, some experts' rows and columns of the stack, equals
    that slice of the whole stack."""
    reader = safetensors_io.Reader(tiny_qwen35_moe[0])
    parts = [[reader.get(EXPERTS.format(1) + f"{e}.{p}.weight") for p in ("gate_proj", "up_proj")] for e in range(4)]
    view = hf._PerExpert(parts)
    whole = np.asarray(view)
    assert whole.shape == (4, 64, 48)
    index = (slice(2, 4), slice(16, 48), slice(20, 30))  # columns across the gate/up boundary
    np.testing.assert_array_equal(view[index], whole[index])


def _drop_up(t):
    t.pop(EXPERTS.format(3) + "2.up_proj.weight")


def _narrow_down(t):
    t[EXPERTS.format(3) + "1.down_proj.weight"] = np.zeros((64, 23), np.float32)


def _both(t):
    t[EXPERTS.format(3) + "down_proj"] = np.zeros((4, 64, 24), np.float32)


@pytest.mark.parametrize("edit, message", [
    (_drop_up, r"missing tensors \(1\): model\.language_model\.layers\.3\.mlp\.experts\.gate_up_proj\n"
               r".*unexpected tensors \(7\): model\.language_model\.layers\.3\.mlp\.experts\.0\.gate_proj"),
    (_narrow_down, r"layers\.3\.mlp\.experts\.1\.down_proj\.weight: expected shape \(64, 24\), found \(64, 23\)"),
    (_both, r"layers\.3\.mlp\.experts\.down_proj' is stored both stacked and per expert"),
], ids=["incomplete", "misshapen", "both"])
def test_bad_per_expert_tensors_are_named(tiny_qwen35_moe, tmp_path, edit, message):
    folder, _ = tiny_qwen35_moe
    out = tmp_path / "bad"
    out.mkdir()
    tensors = safetensors.numpy.load_file(os.path.join(folder, "model.safetensors"))
    edit(tensors)
    safetensors.numpy.save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.join(folder, "config.json"), out)
    with pytest.raises(hf.CheckpointMismatchError, match=message):
        hf.load_hf(str(out))


def test_sharded_equals_single_device(tiny_qwen35_moe, capfd):
    """On an (fsdp 2, expert 2, tensor 2) mesh, the experts expert-parallel, = one device in float64."""
    tq.check_sharded_float64(tiny_qwen35_moe[0], capfd)
