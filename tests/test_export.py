"""`python -m rdpo_jax.export`: a trained smoke run's checkpoint as a Hugging Face folder that transformers
loads with no missing or unexpected keys and the same logits, with its tokenizer and processor."""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from rdpo_jax import checkpoint, export
from rdpo_jax.models import hf, safetensors_io
from rdpo_jax.models.config import RunSettings
from tests import runs


def _params(model):
    flat = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def _inputs(cfg, batch=2, length=40, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, cfg.text.vocab_size, (batch, length)).astype(np.int32)
    ids[ids == cfg.image_token_id] = 4  # placeholders only where the image goes
    ids[:, 2:2 + cfg.image_seq_len] = cfg.image_token_id
    size = cfg.vision.image_size
    return ids, rng.standard_normal((batch, size, size, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def exported(sft_run, tmp_path_factory):
    workdir, _ = sft_run
    out = str(tmp_path_factory.mktemp("export") / "hf")
    summary = export.export(workdir, out)
    return workdir, out, summary


def test_transformers_loads_the_export_with_equal_logits(exported, smoke_dir):
    import torch
    import transformers

    workdir, out, summary = exported
    assert summary["step"] == 6 and summary["dtype"] == "float32"
    model, cfg, folder, step = checkpoint.load_model(workdir)
    assert (folder, step) == (f"{smoke_dir}/model", 6)
    torch_model, info = transformers.AutoModelForImageTextToText.from_pretrained(
        out, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids, images = _inputs(cfg)
    expected = np.asarray(nnx.jit(lambda m, i, p: m(i, p))(model, jnp.asarray(ids), jnp.asarray(images)))
    with torch.no_grad():
        got = torch_model.eval()(input_ids=torch.tensor(ids, dtype=torch.long),
                                 pixel_values=torch.tensor(images.transpose(0, 3, 1, 2))).logits.numpy()
    assert np.abs(got - expected).max() <= 1e-4


def test_export_carries_tokenizer_processor_and_card(exported, smoke_dir):
    import transformers

    workdir, out, summary = exported
    base = f"{smoke_dir}/model"
    processor = transformers.AutoProcessor.from_pretrained(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    original = transformers.AutoProcessor.from_pretrained(base)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is here"}]}]
    assert processor.apply_chat_template(messages) == original.apply_chat_template(messages)
    assert tokenizer("a b c")["input_ids"] == original.tokenizer("a b c")["input_ids"]
    assert processor.image_processor.to_dict() == original.image_processor.to_dict()
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert generation.eos_token_id == original.tokenizer.eos_token_id
    for name in os.listdir(base):  # every tokenizer/processor file of the base folder came along
        if not name.endswith(".safetensors") and name != "config.json":
            assert os.path.exists(os.path.join(out, name)), name
    card = open(os.path.join(out, "README.md")).read()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "step 6" in card and "| objective | `sft` |" in card and '"total_steps": 6' in card
    last = [r for r in runs.metrics(workdir) if "loss" in r][-1]
    assert f"| loss | {last['loss']:.6g} |" in card
    assert sorted(os.listdir(os.path.dirname(out))) == ["hf"]  # no staging folder left behind


def test_load_hf_reads_the_export_exactly(exported):
    workdir, out, _ = exported
    restored, *_ = checkpoint.load_model(workdir)
    loaded, _ = hf.load_hf(out, RunSettings(scan_layers="on"))  # the run's layout: stacked layers
    a, b = _params(restored), _params(loaded)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))


def test_command_exports_an_earlier_step_in_bf16_shards(sft_run, compile_cache, tmp_path):
    workdir, _ = sft_run
    out = str(tmp_path / "step4")
    log = runs.call("rdpo_jax.export", f"--workdir={workdir}", "--step=4", f"--out={out}", "--dtype=bfloat16",
                    "--max_shard_size=200KB", compile_cache=compile_cache)  # the command, in this process
    assert f"exported {workdir} step 4 as bfloat16" in log
    with open(os.path.join(out, safetensors_io.INDEX_FILE)) as f:
        index = json.load(f)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(os.path.getsize(os.path.join(out, s)) < 400_000 for s in shards)
    assert json.load(open(os.path.join(out, "config.json")))["text_config"]["dtype"] == "bfloat16"
    restored, *_ = checkpoint.load_model(workdir, step=4)
    loaded, _ = hf.load_hf(out, RunSettings(param_dtype=jnp.bfloat16, scan_layers="on"))
    a, b = _params(restored), _params(loaded)
    for k in a:
        assert b[k].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(a[k].astype(ml_dtypes.bfloat16), b[k], err_msg=str(k))
    step6, *_ = checkpoint.load_model(workdir)
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(_params(step6)), jax.tree.leaves(a)))


def test_refuses_to_overwrite_and_names_missing_steps(sft_run, tmp_path):
    workdir, _ = sft_run
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export.export(workdir, str(out))
    assert (out / "keep.txt").read_text() == "user data"
    with pytest.raises(FileNotFoundError, match=r"--step=5: .* saved steps: \[4, 6\]"):
        export.export(workdir, str(tmp_path / "new"), step=5)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        export.export(str(tmp_path / "absent"), str(tmp_path / "new"))
    with pytest.raises(FileNotFoundError, match="not a training run"):
        export.export(str(out), str(tmp_path / "new"))
    export.export(workdir, str(out), overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_parse_size():
    assert export.parse_size("5GB") == 5 * 10**9
    assert export.parse_size("500MiB") == 500 * 2**20
    assert export.parse_size("1.5kb") == 1500
    assert export.parse_size("1234") == 1234
    with pytest.raises(ValueError, match="--max_shard_size='big'"):
        export.parse_size("big")
