"""PEFT LoRA folders (models/peft_io.py, `python -m rdpo_jax.export --adapters_only`): transformers with
`peft.PeftModel.from_pretrained` of the folder computes what our adapted model computes (fp32, ≤ 1e-4 on
logits) with no missing or unexpected adapter keys — projections, a fused projection (Qwen2.5-VL's vision
qkv), the head, a MoE's experts one or both of whose weights are adapted; per layer and scanned — and a
LoRA run's adapters export as that folder over its LLaVA base; a full fine-tuning run's do not."""

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx

from rdpo_jax import checkpoint, export
from rdpo_jax.models import families, hf, lora, peft_io
from rdpo_jax.models.config import RunSettings
from tests import runs
from tests import tiny_qwen as tq

ATOL = 1e-4
TEXT_ROWS = [([17], "right"), ([11], "left"), ([20], "right")]
# every kind of Linear: the decoder's projections, the vision tower's fused qkv, the merger, the head
QWEN_TARGETS = (lora.DECODER, r"visual/blocks/(\d+/)?attn/qkv/kernel", "visual/merger/mlp/0/kernel", "lm_head/kernel")
# (model, layers, targets, rows)
CASES = {
    "qwen2_5_vl-looped": ("qwen2_5_vl", "off", QWEN_TARGETS, tq.ROWS),  # rows with images and a text-only one
    "qwen2_5_vl-scanned": ("qwen2_5_vl", "on", QWEN_TARGETS, tq.ROWS),
    # both expert weights adapted (PEFT nests the two parameters' wrappers), every layer sparse
    "qwen3_vl_moe-scanned": ("sparse", "on", (lora.DECODER,), TEXT_ROWS),
    # a dense layer among sparse ones, the experts' down_proj alone adapted
    "qwen3_vl_moe-looped": ("mixed", "off", (r"language_model/layers/\d+/(self_attn/[qkvo]_proj/kernel|mlp/experts/"
                                             r"down_proj|mlp/(gate|up|down)_proj/kernel)",), TEXT_ROWS),
}


@pytest.fixture(scope="session")
def tiny_models(tiny_qwen, tmp_path_factory):
    """`tiny_models(kind) -> (folder, torch model)`: Qwen2.5-VL ("qwen2_5_vl", conftest's) or Qwen3-VL-MoE
    ("sparse": every layer sparse, tied; "mixed": layer 0 dense, untied), built once per session."""
    cache = {}

    def get(kind):
        if kind == "qwen2_5_vl":
            return tiny_qwen(False)
        if kind not in cache:
            text = dict(mlp_only_layers=[]) if kind == "sparse" else {}
            cache[kind] = tq.build(kind == "sparse", str(tmp_path_factory.mktemp(f"peft_moe_{kind}")),
                                   family="qwen3_vl_moe", **text)
        return cache[kind]

    return get


def _randomize(model, seed=1):
    """Nonzero A and B (a fresh B is 0): adapters that change the model."""
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.LoRAParam)
    nnx.update(model, jax.tree.map(lambda x: jnp.asarray(0.2 * rng.standard_normal(x.shape), jnp.float32), state))


def _load_peft(base, folder):
    """`PeftModel.from_pretrained(base, folder)`, its adapter keys checked: loading the folder again reports
    no missing or unexpected adapter keys."""
    model = peft.PeftModel.from_pretrained(base, folder)
    result = model.load_adapter(folder, adapter_name="check")
    assert not result.missing_keys and not result.unexpected_keys, result
    model.set_adapter("default")
    return model.eval()


def _torch_logits(model, batch):
    if any(batch["grids"]):
        return tq.torch_logits(model, batch)
    with torch.no_grad():
        return model(input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
                     attention_mask=torch.tensor(batch["attention_mask"], dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("case", list(CASES))
def test_peft_computes_what_our_adapted_model_computes(tiny_models, tmp_path, case):
    kind, scan, targets, rows = CASES[case]
    folder, theirs = tiny_models(kind)
    settings = lora.LoRASettings(rank=4, alpha=8.0, targets=targets)
    model, cfg = hf.load_hf(folder, RunSettings(scan_layers=scan))
    model = families.adapt(model, settings)
    _randomize(model)
    files = peft_io.save_adapters(model, str(tmp_path), base_model_name_or_path=folder, settings=settings)
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.load(open(tmp_path / "adapter_config.json"))
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (4, 8, folder)
    assert bool(config["target_parameters"]) == (kind != "qwen2_5_vl")  # the experts

    batch = tq.inputs(rows, length=64 if rows is tq.ROWS else 24)
    images, positions = tq.ours(batch, cfg.vision)
    ours = np.asarray(model(batch["input_ids"], images if any(batch["grids"]) else None, batch["attention_mask"],
                            positions))
    adapted = _load_peft(copy.deepcopy(theirs), str(tmp_path))
    got, base = _torch_logits(adapted, batch), _torch_logits(theirs, batch)
    valid = batch["attention_mask"].astype(bool)
    assert np.abs(got[valid] - base[valid]).max() > 1.0  # the adapters change the model
    np.testing.assert_allclose(got[valid], ours[valid], rtol=0, atol=ATOL)


@pytest.fixture(scope="session")
def lora_run(smoke_dir, compile_cache, tmp_path_factory):
    """A 2-step LoRA DPO run (rank 4, the reference the base with adapters off) of the LLaVA smoke model."""
    workdir = str(tmp_path_factory.mktemp("lora_run") / "run")
    runs.call("rdpo_jax.train", *runs.train_args(smoke_dir, workdir, "--config.total_steps=2", "--config.lora.rank=4",
                                                 "--config.dpo.reference=base", "--config.data.eval="),
              compile_cache=compile_cache)
    return workdir


def test_command_exports_a_lora_runs_adapters_that_peft_loads_onto_llava(lora_run, smoke_dir, compile_cache,
                                                                         tmp_path):
    out = str(tmp_path / "adapter")
    base = f"{smoke_dir}/model"
    log = runs.call("rdpo_jax.export", f"--workdir={lora_run}", "--adapters_only", f"--out={out}",
                    compile_cache=compile_cache)
    assert f"exported {lora_run} step 2 as a PEFT LoRA adapter over {base}" in log
    files = set(os.listdir(out))
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json"} <= files
    assert not files & {"config.json", "model.safetensors"}
    assert json.load(open(os.path.join(out, "adapter_config.json")))["base_model_name_or_path"] == base
    card = open(os.path.join(out, "README.md")).read()
    assert card.startswith("---\nlibrary_name: peft\n")
    assert f"A PEFT LoRA adapter (rank 4, alpha 16.0) over `{base}`" in card
    assert (r"| lora.targets | `language_model/layers/(\d+/)?(self_attn/[qkvo]_proj/kernel\|linear_attn/"
            r"(in_proj_qkv\|in_proj_z\|out_proj)/kernel\|mlp/") in card  # one cell

    ours, cfg, *_ = checkpoint.load_model(lora_run, merge=False)
    assert np.abs(np.asarray(ours.language_model.layers[0].self_attn.q_proj.kernel_lora_b[...])).max() > 0  # trained
    rng = np.random.default_rng(0)
    ids = rng.integers(4, cfg.text.vocab_size, (2, 24)).astype(np.int32)
    ids[ids == cfg.image_token_id] = 4
    ids[:, 2:2 + cfg.image_seq_len] = cfg.image_token_id
    images = rng.standard_normal((2, cfg.vision.image_size, cfg.vision.image_size, 3)).astype(np.float32)
    expected = np.asarray(nnx.jit(lambda m, i, p: m(i, p))(ours, jnp.asarray(ids), jnp.asarray(images)))
    theirs = transformers.LlavaForConditionalGeneration.from_pretrained(base, attn_implementation="eager").eval()
    inputs = dict(input_ids=torch.tensor(ids, dtype=torch.long),
                  pixel_values=torch.tensor(images.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        plain = theirs(**inputs).logits.numpy()
        got = _load_peft(theirs, out)(**inputs).logits.numpy()
    assert np.abs(got - plain).max() > 0.01  # two steps' adapters change the model
    assert np.abs(got - expected).max() <= ATOL


def test_base_model_names_a_hub_id_in_the_config_and_card(lora_run, tmp_path):
    summary = export.export_adapters(lora_run, str(tmp_path / "out"), base_model="org/tiny-llava")
    assert summary["step"] == 2 and summary["base_model"] == "org/tiny-llava"
    config = json.load(open(tmp_path / "out" / "adapter_config.json"))
    assert config["base_model_name_or_path"] == "org/tiny-llava"
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\nbase_model: org/tiny-llava\n")


def test_adapters_only_refuses_a_full_fine_tuning_run(sft_run, tmp_path):
    workdir, _ = sft_run
    with pytest.raises(ValueError, match="a full fine-tuning run .* has no adapters; export the whole model"):
        export.export_adapters(workdir, str(tmp_path / "out"))
    assert not os.listdir(tmp_path)
