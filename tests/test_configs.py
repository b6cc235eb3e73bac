"""Config files build and validate; each semantic mistake is a clear error naming the field."""

import json
import math

import pytest
import transformers
from flax import nnx

from configs import (llava15_7b_gpu, llava15_7b_tpu, qwen3vl_8b_gpu, qwen3vl_8b_tpu, qwen3vl_30b_a3b_gpu,
                     qwen3vl_30b_a3b_tpu, qwen25vl_7b_gpu, qwen25vl_7b_tpu, qwen35_27b_tpu, smoke)
from rdpo_jax import config_checks, defaults, sharding
from rdpo_jax.models import families, hf


@pytest.fixture(scope="module")
def llava7b_folder(tmp_path_factory):
    """config.json of LLaVA-1.5-7B (CLIP ViT-L/336 + Llama-2-7B), no weights: enough to plan a run."""
    folder = tmp_path_factory.mktemp("llava7b")
    cfg = transformers.LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                           num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14,
                           projection_dim=768),
        text_config=dict(model_type="llama", vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                         max_position_embeddings=4096),
        image_token_index=32000, vision_feature_layer=-2, vision_feature_select_strategy="default")
    cfg.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def qwen7b_folder(tmp_path_factory):
    """config.json of Qwen2.5-VL-7B-Instruct (the Hub's values), no weights."""
    folder = tmp_path_factory.mktemp("qwen7b")
    cfg = transformers.Qwen2_5_VLConfig(
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31], out_hidden_size=3584, tokens_per_second=2),
        text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                         rms_norm_eps=1e-6, rope_parameters=dict(rope_type="default", rope_theta=1e6,
                                                                 mrope_section=[16, 24, 24])),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=False)
    cfg.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def qwen3_8b_folder(tmp_path_factory):
    """config.json of Qwen3-VL-8B-Instruct (`benchmarks/presets.py`), no weights."""
    from benchmarks import presets

    folder = tmp_path_factory.mktemp("qwen3_8b")
    presets.hf_config("qwen3-vl-8b").save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def qwen3_30b_a3b_folder(tmp_path_factory):
    """config.json of Qwen3-VL-30B-A3B-Instruct (`benchmarks/presets.py`), no weights."""
    from benchmarks import presets

    folder = tmp_path_factory.mktemp("qwen3_30b_a3b")
    presets.hf_config("qwen3-vl-30b-a3b").save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def qwen35_27b_folder(tmp_path_factory):
    """config.json of Qwen3.5-27B (`benchmarks/presets.py`), no weights."""
    from benchmarks import presets

    folder = tmp_path_factory.mktemp("qwen35_27b")
    presets.hf_config("qwen3.5-27b").save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("module,devices,processes,mesh,per_device,folder,size", [
    (llava15_7b_tpu, 32, 8, {"data": 1, "fsdp": 32, "expert": 1, "tensor": 1}, 8, "llava7b_folder", (7.0e9, 7.2e9)),
    (llava15_7b_gpu, 8, 1, {"data": 1, "fsdp": 8, "expert": 1, "tensor": 1}, 2, "llava7b_folder", (7.0e9, 7.2e9)),
    (qwen25vl_7b_tpu, 32, 8, {"data": 1, "fsdp": 32, "expert": 1, "tensor": 1}, 8, "qwen7b_folder", (8.2e9, 8.4e9)),
    (qwen25vl_7b_gpu, 8, 1, {"data": 1, "fsdp": 8, "expert": 1, "tensor": 1}, 2, "qwen7b_folder", (8.2e9, 8.4e9)),
    (qwen3vl_8b_tpu, 32, 8, {"data": 1, "fsdp": 32, "expert": 1, "tensor": 1}, 8, "qwen3_8b_folder", (8.7e9, 8.85e9)),
    (qwen3vl_8b_gpu, 8, 1, {"data": 1, "fsdp": 8, "expert": 1, "tensor": 1}, 2, "qwen3_8b_folder", (8.7e9, 8.85e9)),
    (qwen3vl_30b_a3b_tpu, 32, 8, {"data": 1, "fsdp": 16, "expert": 2, "tensor": 1}, 8, "qwen3_30b_a3b_folder",
     (31.0e9, 31.2e9)),
    (qwen3vl_30b_a3b_gpu, 8, 1, {"data": 1, "fsdp": 4, "expert": 2, "tensor": 1}, 1, "qwen3_30b_a3b_folder",
     (31.0e9, 31.2e9)),
    (qwen35_27b_tpu, 16, 4, {"data": 1, "fsdp": 16, "expert": 1, "tensor": 1}, 2, "qwen35_27b_folder",
     (27.3e9, 27.4e9)),
])
def test_real_scale_configs_plan_sensibly(request, module, devices, processes, mesh, per_device, folder, size):
    folder = request.getfixturevalue(folder)
    c = module.get_config(f"model={folder},data=/data/pairs")
    assert config_checks.validate(c, num_devices=devices, num_processes=processes) == mesh
    micro = c.data.batch_size // c.accum_steps
    assert micro // (mesh["data"] * mesh["fsdp"] * mesh["expert"]) == per_device  # pairs per device per micro-batch
    model_cfg = hf.read_config(folder)
    params = nnx.to_flat_state(nnx.state(families.abstract_model(model_cfg), nnx.Param))
    n = sum(v.get_value().size for _, v in params)
    assert size[0] < n < size[1]
    # every weight is split as far as its axes go: a MoE's experts over fsdp × expert, the rest over
    # fsdp × tensor (replicated along expert, which is data parallelism for them); with data = 1 and no
    # experts that is total / devices
    per_device, experts = 0, 0
    for _, v in params:
        shape = v.get_value().shape
        spec = sharding.variable_spec(v, mesh)
        shards = math.prod(mesh[a] for axes in spec if axes for a in ((axes,) if isinstance(axes, str) else axes))
        per_device += math.prod(shape) / shards
        experts += math.prod(shape) if "expert" in (v.get_metadata().get("logical_axes") or ()) else 0
    bound = (n - experts) / (mesh["fsdp"] * mesh["tensor"]) + experts / (mesh["fsdp"] * mesh["expert"])
    assert per_device < 1.01 * bound


def test_smoke_config_and_arguments(smoke_dir):
    c = smoke.get_config(f"dir={smoke_dir},objective=sft")
    assert c.objective == "sft" and c.data.train.endswith("/sft")
    config_checks.validate(c, num_devices=8, num_processes=1)
    with pytest.raises(ValueError, match="expected key=value pairs with keys \\['dir'\\]"):
        smoke.get_config("objective=sft")


def _valid(smoke_dir):
    return smoke.get_config(f"dir={smoke_dir}")


CASES = [  # (edit, message)
    (lambda c: c.data.update(batch_size=6), "micro-batches of 6 .* not divisible by data × fsdp × expert = 4"),
    (lambda c: c.update(accum_steps=3), "8 is not divisible by accum_steps=3"),
    (lambda c: c.mesh.update(fsdp=16), "config.mesh: .* 8 devices are not divisible"),
    (lambda c: c.mesh.update(data=4, fsdp=4), "needs 32 devices, but 8 are available"),
    (lambda c: c.dpo.update(loss_type="kto"), "config.dpo.loss_type: 'kto' is not one of"),
    (lambda c: c.dpo.update(loss_type="ipo"), "config.dpo.length_norm: loss_type 'ipo' expects"),
    (lambda c: c.dpo.update(reference="teacher"), "config.dpo.reference: 'teacher'"),
    (lambda c: c.update(init_from="/no/such/run"), "config.init_from: '/no/such/run'"),
    (lambda c: c.model.update(dtype="fp8"), "config.model.dtype: 'fp8'"),
    (lambda c: c.model.update(param_dtype="bfloat16"), "config.model.param_dtype: 'bfloat16': training keeps float32"),
    (lambda c: c.optim.update(freeze="vision_tower/(("), "config.optim.freeze: 'vision_tower/\\(\\(' is not a regex"),
    (lambda c: c.optim.update(lr_multipliers="proj/.*"), "config.optim.lr_multipliers: 'proj/.\\*' is not REGEX"),
    (lambda c: c.data.update(seq_buckets=(64, 32)), "config.data.seq_buckets: must be increasing"),
    (lambda c: c.update(objective="rlhf"), "config.objective: 'rlhf'"),
    (lambda c: c.data.update(groups_per_row=2), "config.data.groups_per_row: 2: records share rows only in SFT and "
                                                "in DPO's multi_answer layout"),
    (lambda c: (c.data.update(groups_per_row=4), c.dpo.update(pair_layout="multi_answer")),
     "config.data.groups_per_row: 4: .* the 2 rows must split into accum_steps=1 micro-batches divisible by data × "
     "fsdp × expert = 4"),
]


@pytest.mark.parametrize("edit,message", CASES, ids=[m.split(":")[0][:40] for _, m in CASES])
def test_semantic_errors(smoke_dir, edit, message):
    c = _valid(smoke_dir)
    edit(c)
    with pytest.raises(config_checks.ConfigError, match=message):
        config_checks.validate(c, num_devices=8, num_processes=1)


def test_batch_must_split_over_processes(smoke_dir):
    with pytest.raises(config_checks.ConfigError, match="8 is not divisible by the 3 processes"):
        config_checks.validate(_valid(smoke_dir), num_devices=8, num_processes=3)


def test_precomputed_reference_absent_from_data(smoke_dir):
    from rdpo_jax import train
    from rdpo_jax.data import pipeline

    options = pipeline.Options.from_config(_valid(smoke_dir), reference_fingerprint=hf.fingerprint(f"{smoke_dir}/model"))
    with pytest.raises(config_checks.ConfigError, match="'precomputed', but pairs-00000-of-00002.array_record\\[0\\]"):
        train._check_reference_data(f"{smoke_dir}/pairs", options)


def test_locked_config_rejects_a_typo(smoke_dir, tmp_path):
    import os

    from tests import runs

    with pytest.raises(AttributeError, match="Did you mean \"learning_rate\" instead of \"learnin_rate\""):
        runs.call("rdpo_jax.train", f"--config=configs/smoke.py:dir={smoke_dir}", "--config.optim.learnin_rate=0.1",
                  f"--workdir={tmp_path}")  # the command, in this process
    assert not os.listdir(tmp_path)  # nothing ran


def test_base_holds_every_key_with_a_comment():
    text = open(defaults.__file__).read().split("\ndef train()", 1)[1].split("\ndef loop()", 1)[0]
    c = defaults.train()
    for key in json.loads(c.to_json()):
        assert f"c.{key}" in text, key
    for line in text.splitlines():
        if line.strip().startswith("c.") and " = " in line and "ConfigDict()" not in line:
            assert "#" in line, line  # every key says what it is
