"""LoRA on Qwen3.5: the default targets adapt the DeltaNet's q|k|v, z and output projections (not its per-head
β and decay inputs) beside attention and the MLP, in scanned blocks; PEFT loading our exported folder onto
transformers' model computes what our adapted model computes."""

import copy

import numpy as np
from flax import nnx

from rdpo_jax.models import families, hf, lora, peft_io
from rdpo_jax.models.config import RunSettings
from tests import tiny_qwen as tq
from tests.models.test_peft_io import _load_peft, _randomize, _torch_logits


def test_peft_computes_what_our_adapted_model_computes(tiny_qwen35, tmp_path):
    folder, theirs = tiny_qwen35(False)
    settings = lora.LoRASettings(rank=4, alpha=8.0)
    model, cfg = hf.load_hf(folder, RunSettings(scan_layers="on"))
    model = families.adapt(model, settings)
    adapted = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
    deltanet = {a.split("linear_attn/")[1] for a in adapted if "linear_attn" in a}
    assert deltanet == {"in_proj_qkv/kernel_lora_a", "in_proj_qkv/kernel_lora_b", "in_proj_z/kernel_lora_a",
                        "in_proj_z/kernel_lora_b", "out_proj/kernel_lora_a", "out_proj/kernel_lora_b"}
    assert any("self_attn/q_proj" in a for a in adapted) and any("mlp/down_proj" in a for a in adapted)
    _randomize(model)
    peft_io.save_adapters(model, str(tmp_path), base_model_name_or_path=folder, settings=settings)

    batch = tq.inputs(tq.ROWS)
    images, positions = tq.ours(batch, cfg.vision)
    ours = np.asarray(model(batch["input_ids"], images, batch["attention_mask"], positions))
    theirs_adapted = _load_peft(copy.deepcopy(theirs), str(tmp_path))
    got, base = _torch_logits(theirs_adapted, batch), _torch_logits(theirs, batch)
    valid = batch["attention_mask"].astype(bool)
    assert np.abs(got[valid] - base[valid]).max() > 1.0  # the adapters change the model
    np.testing.assert_allclose(got[valid], ours[valid], rtol=0, atol=1e-4)
