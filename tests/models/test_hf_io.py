"""Hugging Face IO: export loads in transformers, round trips are exact, every layout reads, bad input fails."""

import json
import os
import shutil
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import transformers
from flax import nnx

from jax.sharding import PartitionSpec as P

from rdpo_jax import sharding
from rdpo_jax.models import config as config_lib
from rdpo_jax.models import families, hf, safetensors_io, vlm
from tests import tiny


def _flat(model):
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _assert_same_params(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and np.array_equal(fa[k], fb[k]), k


@pytest.mark.parametrize("name", ["siglip_qwen2", "siglip_qwen3"])
def test_save_hf_loads_in_transformers_with_same_logits(tiny_llava, tmp_path, name):
    folder, _ = tiny_llava(name)
    model, cfg = hf.load_hf(folder)
    files = hf.save_hf(model, str(tmp_path), folder)
    assert files == ["config.json", "model.safetensors"]
    loaded, info = transformers.LlavaForConditionalGeneration.from_pretrained(
        str(tmp_path), output_loading_info=True, attn_implementation="eager")
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    batch = tiny.inputs(name)
    diff = tiny.max_diff_on_tokens(tiny.jax_logits(model, batch), tiny.torch_logits(loaded.eval(), batch),
                                   batch["attention_mask"])
    assert diff <= 1e-4
    keys = safetensors_io.Reader(str(tmp_path)).keys()  # the llava-hf Hub layout
    assert "language_model.model.embed_tokens.weight" in keys
    assert any(k.startswith("vision_tower.vision_model.encoder.layers.0.") for k in keys)
    assert ("language_model.lm_head.weight" in keys) == (not cfg.tie_word_embeddings)


def test_round_trip_is_exact_and_sharded_index(tiny_llava, tmp_path):
    folder, torch_model = tiny_llava("clip_llama")
    model, cfg = hf.load_hf(folder)
    files = hf.save_hf(model, str(tmp_path), folder, max_shard_bytes=64 * 1024)
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files
    with open(tmp_path / "model.safetensors.index.json") as f:
        index = json.load(f)
    assert set(index["weight_map"].values()) == set(shards)
    again, cfg2 = hf.load_hf(str(tmp_path))
    assert cfg2 == cfg
    _assert_same_params(model, again)
    loaded, info = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for k, v in torch_model.state_dict().items():
        assert np.array_equal(v.numpy(), loaded.state_dict()[k].numpy()), k


def test_reads_every_layout(tiny_llava, tmp_path):
    """transformers' in-memory names (`model.language_model.*`, 5.x vision names) and our Hub-layout export."""
    folder, torch_model = tiny_llava("siglip_qwen2")
    reference, cfg = hf.load_hf(folder)  # transformers 5.x save_pretrained layout
    in_memory = tmp_path / "in_memory"
    in_memory.mkdir()
    shutil.copy(os.path.join(folder, "config.json"), in_memory)
    state = {k: v.contiguous() for k, v in torch_model.state_dict().items()}
    assert any(k.startswith("model.language_model.") for k in state)
    safetensors.torch.save_file(state, str(in_memory / "model.safetensors"), metadata={"format": "pt"})
    _assert_same_params(reference, hf.load_hf(str(in_memory))[0])
    hub = tmp_path / "hub"
    hf.save_hf(reference, str(hub), folder)
    _assert_same_params(reference, hf.load_hf(str(hub))[0])


def test_bfloat16_checkpoint_loads_and_exports(tiny_llava, tmp_path):
    folder, _ = tiny_llava("siglip_qwen2")
    model, cfg = hf.load_hf(folder)
    hf.save_hf(model, str(tmp_path), folder, dtype=jnp.bfloat16)
    assert json.load(open(tmp_path / "config.json"))["dtype"] == "bfloat16"
    bf16_model, bf16_cfg = hf.load_hf(str(tmp_path), config_lib.RunSettings(param_dtype=jnp.bfloat16))
    for k, v in _flat(bf16_model).items():
        assert v.dtype == jnp.bfloat16
        np.testing.assert_array_equal(v, _flat(model)[k].astype(jnp.bfloat16), err_msg=k)


def _host_bytes_while_loading(folder: str, run: config_lib.RunSettings) -> tuple[int, int]:
    """(the loaded model's bytes, the peak of Python-allocated host memory — numpy buffers included, device
    buffers not — that `load_hf` held above what was held before it)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        model, _ = hf.load_hf(folder, run)
        leaves = jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return sum(x.nbytes for x in leaves), peak - before


def test_stacked_load_holds_one_layer_per_thread_whatever_the_depth(tmp_path):
    """Stacked (scanned) layers stream into their [L, …] arrays: while loading, host memory beyond the model
    holds at most one layer's tensor per loading thread, a bound without the depth in it (before: every
    stacked weight's whole [L, …] array, 4 at a time: ~2 bytes per model byte at any depth). Bytes in
    flight are counted by tracemalloc (every numpy buffer, exactly), not RSS, which XLA's compiles and the
    allocator's reuse blur by tens of MB in a test process; `benchmarks/load_memory.py` measures RSS."""
    depth, mlp = 8, 8192  # each decoder layer holds three 2 MiB MLP tensors
    hf_config = transformers.LlavaConfig(
        vision_config=tiny.CONFIGS["siglip_qwen2"]["vision_config"],
        text_config=dict(tiny.CONFIGS["siglip_qwen2"]["text_config"], intermediate_size=mlp, num_hidden_layers=depth),
        image_token_index=tiny.IMAGE_TOKEN, vision_feature_layer=-1, vision_feature_select_strategy="full")
    transformers.LlavaForConditionalGeneration(hf_config).save_pretrained(str(tmp_path))
    model_bytes, held = _host_bytes_while_loading(str(tmp_path), config_lib.RunSettings(scan_layers="on"))
    layer_tensor = hf_config.text_config.hidden_size * mlp * 4  # the largest tensor of one layer, float32
    bound = (hf._LOAD_THREADS + 1) * layer_tensor + 6 * 2**20  # + Python's own objects (the abstract model)
    assert held <= bound, (f"loading held {held / 2**20:.1f} MiB of host memory beyond the model "
                           f"({model_bytes / 2**20:.1f} MiB, {depth} layers); at most {bound / 2**20:.1f} MiB expected")


# ----- bad input: each a clear error naming the key or field -----

def _copy_with(folder, tmp_path, edit_tensors=None, edit_config=None):
    out = tmp_path / "bad"
    out.mkdir()
    tensors = safetensors.numpy.load_file(os.path.join(folder, "model.safetensors"))
    if edit_tensors:
        edit_tensors(tensors)
    safetensors.numpy.save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    if edit_config:
        edit_config(config)
    with open(out / "config.json", "w") as f:
        json.dump(config, f)
    return str(out)


def test_missing_tensor_is_named(tiny_llava, tmp_path):
    folder, _ = tiny_llava("siglip_qwen2")
    key = "language_model.model.layers.1.mlp.up_proj.weight"
    bad = _copy_with(folder, tmp_path, edit_tensors=lambda t: t.pop(key))
    with pytest.raises(hf.CheckpointMismatchError, match=r"missing tensors \(1\): language_model\.model\.layers\.1\.mlp\.up_proj\.weight"):
        hf.load_hf(bad)


def test_extra_tensor_is_named(tiny_llava, tmp_path):
    folder, _ = tiny_llava("siglip_qwen2")
    bad = _copy_with(folder, tmp_path, edit_tensors=lambda t: t.update(
        {"language_model.model.layers.0.self_attn.rotary.weight": np.zeros(3, np.float32)}))
    with pytest.raises(hf.CheckpointMismatchError,
                       match=r"unexpected tensors \(1\): language_model\.model\.layers\.0\.self_attn\.rotary\.weight"):
        hf.load_hf(bad)


def test_wrong_shape_is_named(tiny_llava, tmp_path):
    folder, _ = tiny_llava("siglip_qwen2")
    key = "multi_modal_projector.linear_1.weight"

    def edit(t):
        t[key] = np.zeros((64, 31), np.float32)

    bad = _copy_with(folder, tmp_path, edit_tensors=edit)
    with pytest.raises(hf.CheckpointMismatchError, match=r"multi_modal_projector\.linear_1\.weight: expected shape \(64, 32\), found \(64, 31\)"):
        hf.load_hf(bad)


@pytest.mark.parametrize("edit,field", [
    (lambda c: c["text_config"].update(model_type="mistral"), "text_config.model_type"),
    (lambda c: c["vision_config"].update(model_type="pixtral"), "vision_config.model_type"),
    (lambda c: c.update(model_type="qwen2_vl"), "model_type"),
    (lambda c: c["text_config"].update(rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=1e4)),
     "rope_parameters.rope_type"),
    (lambda c: c["text_config"].update(use_sliding_window=True, sliding_window=16), "use_sliding_window"),
])
def test_unsupported_config_is_named(tiny_llava, tmp_path, edit, field):
    folder, _ = tiny_llava("siglip_qwen2")
    bad = _copy_with(folder, tmp_path, edit_config=edit)
    with pytest.raises(config_lib.UnsupportedConfigError, match=rf"config\.json: .*{field}"):
        hf.load_hf(bad)


def test_missing_folder_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hf.load_hf(str(tmp_path))


def test_image_placeholder_mismatch_raises_eager_and_jit(tiny_llava):
    folder, _ = tiny_llava("siglip_qwen2")
    model, cfg = hf.load_hf(folder)
    batch = tiny.inputs("siglip_qwen2", batch=2)
    ids = batch["input_ids"].copy()
    ids[1, 3] = 7  # one placeholder fewer in row 1
    args = (jnp.asarray(ids), jnp.asarray(batch["pixel_values"]))
    with pytest.raises(vlm.ImageTokenMismatchError, match="row 1 has 15 placeholders, but its images give 16"):
        model(*args)
    with pytest.raises(Exception, match="row 1 has 15 placeholders"):
        jax.block_until_ready(nnx.jit(lambda m, i, p: m(i, p))(model, *args))
    with pytest.raises(vlm.ImageTokenMismatchError, match="row 0 has 16 placeholders, but its images give 0"):
        model(jnp.asarray(batch["input_ids"]), None)


def test_create_is_born_sharded_and_round_trips(tmp_path):
    hf_config = tiny.hf_config("siglip_qwen3")
    cfg = families.from_hf(hf_config)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = families.create(cfg, mesh=mesh, seed=1)
    kernel = model.language_model.layers[0].mlp.gate_proj.kernel.get_value()
    assert kernel.sharding.spec == P("fsdp", "tensor") and kernel.addressable_shards[0].data.shape == (32, 48)
    hf.save_hf(model, str(tmp_path), hf_config)
    again, _ = hf.load_hf(str(tmp_path), mesh=mesh)
    _assert_same_params(model, again)
    assert not np.array_equal(_flat(model)["language_model.embed_tokens.embedding"],
                              _flat(families.create(cfg, seed=2))["language_model.embed_tokens.embedding"])


def test_read_config_is_cached_without_transformers(tiny_llava, tmp_path, monkeypatch):
    """A config read once comes back from the cache in another process that never imports transformers (its
    config classes import torch: seconds of every command's start); a changed config.json, or a cache file
    that cannot be read, is read from the file again."""
    import subprocess
    import sys

    folder, _ = tiny_llava("siglip_qwen3")
    monkeypatch.setenv("RDPO_JAX_CACHE", str(tmp_path / "cache"))
    cfg = hf.read_config(folder)
    [entry] = os.listdir(hf.config_cache())
    probe = ("import sys; from rdpo_jax.models import hf; "
             f"print(repr(hf.read_config({folder!r})), 'transformers' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu")).stdout.strip()
    assert out == f"{cfg!r} False False"
    with open(os.path.join(hf.config_cache(), entry), "wb") as f:
        f.write(b"not a pickle")
    assert hf.read_config(folder) == cfg  # read again, and the entry rewritten
    edited = tmp_path / "edited"
    shutil.copytree(folder, edited)
    raw = json.load(open(edited / "config.json"))
    raw["text_config"]["rms_norm_eps"] = 1e-3
    json.dump(raw, open(edited / "config.json", "w"))
    assert hf.read_config(str(edited)).text.rms_norm_eps == 1e-3
    assert len(os.listdir(hf.config_cache())) == 2
