"""LoRA runs: the step trains the adapters only, `dpo.reference="base"` (the base with the adapters off, in
the same jit) equals an online reference copy and a reference computed by a separate base model; the train
command's checkpoints hold the adapters only, resume bitwise on the base `base.json` names (and refuse
another), and the run loads merged for sampling and exports as a transformers model with its logits."""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rdpo_jax import checkpoint, inference, logps, optim, sharding, train_step
from rdpo_jax.models import hf, lora
from rdpo_jax.models.config import RunSettings
from tests import runs
from tests.test_train_step import B, NAME, _batch, _scalars

SETTINGS = lora.LoRASettings(rank=4, alpha=8.0)


def _lora_run(folder, mesh, batch, *, reference, steps=2, dtype=jnp.float32, **kw):
    model, _ = hf.load_hf(folder, RunSettings(param_dtype=dtype, lora=SETTINGS), mesh=mesh)
    optimizer = optim.make_optimizer(learning_rate=1e-2, weight_decay=0.1, grad_clip=1.0)
    graphdef, state = train_step.init_state(model, optimizer, reference=reference == "model")
    dpo = train_step.DPOSettings(loss_type="sigmoid", beta=0.1, reference=reference, **kw)
    step = train_step.jit_step(train_step.make_dpo_step(graphdef, optimizer, optax.constant_schedule(1e-2), dpo,
                                                        accum_steps=2).train, state, batch, mesh)
    metrics = []
    for _ in range(steps):
        state, m = step(state, batch)
        metrics.append(_scalars(m))
    return state, metrics


@pytest.fixture(scope="module")
def mesh1():
    return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


def test_reference_base_equals_a_separate_copy_and_a_separate_model(tiny_llava, mesh1):
    folder, _ = tiny_llava(NAME)
    base, cfg = hf.load_hf(folder)
    batch = _batch(cfg)
    via_base, m_base = _lora_run(folder, mesh1, batch, reference="base")
    # only the adapters train; the base is frozen and there is no reference copy
    trained = {optim.path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(via_base.params)[0]}
    assert trained and all(p.endswith(lora.ADAPTER) for p in trained), sorted(trained)[:4]
    assert via_base.ref_params is None and not any(
        optim.path_str(kp).endswith(lora.ADAPTER) for kp, _ in jax.tree_util.tree_flatten_with_path(via_base.frozen)[0])
    via_copy, m_copy = _lora_run(folder, mesh1, batch, reference="model")  # a copy of the fresh adapters: B = 0
    # a separate model without adapters computes the reference: precomputed
    ref = logps.pair_logps(base, batch, layout="shared_prefix")
    pre = batch.replace(**{f"ref_{k}": np.asarray(ref[k]).reshape(B, 1) for k in ("chosen_logp", "rejected_logp")})
    via_model, m_model = _lora_run(folder, mesh1, pre, reference="precomputed")
    assert m_base[0]["loss"] == pytest.approx(np.log(2), rel=1e-6)  # fresh adapters: the policy is the reference
    assert m_base[1]["loss"] < m_base[0]["loss"]  # and then it moves
    for other, m_other in ((via_copy, m_copy), (via_model, m_model)):
        for a, b in zip(jax.tree.leaves(via_base.params), jax.tree.leaves(other.params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
        for key in ("loss", "rewards/margins", "grad_norm"):
            assert m_other[1][key] == pytest.approx(m_base[1][key], rel=1e-5, abs=1e-7), key


def test_lora_step_sharded_equals_single_device(tiny_llava, mesh1):
    folder, _ = tiny_llava(NAME)
    _, cfg = hf.load_hf(folder)
    batch = _batch(cfg)
    mesh8 = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with jax.enable_x64(True):
        single, m_single = _lora_run(folder, mesh1, batch, reference="base", dtype=jnp.float64)
        sharded, m_sharded = _lora_run(folder, mesh8, batch, reference="base", dtype=jnp.float64)
    b = sharded.params["language_model"]["layers"][0]["self_attn"]["q_proj"]["kernel_lora_b"]
    assert b.sharding.spec == jax.sharding.PartitionSpec(None, "tensor")  # the rank replicated
    for x, y in zip(jax.tree.leaves(single.params), jax.tree.leaves(sharded.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-10, atol=1e-12)
    assert m_sharded[1]["loss"] == pytest.approx(m_single[1]["loss"], rel=1e-10)


def _adapters(model) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam))]


def test_lora_run_checkpoints_adapters_resumes_bitwise_loads_merged_and_exports(smoke_dir, tmp_path, compile_cache):
    import torch
    import transformers

    workdir = str(tmp_path / "run")
    args = runs.train_args(smoke_dir, workdir, "--config.total_steps=4", "--config.checkpoint.every=2",
                           "--config.log.every=1", "--config.data.eval=", "--config.model.scan_layers=on",
                           "--config.lora.rank=4", "--config.lora.dropout=0.1", "--config.lora.quantize=nf4",
                           "--config.lora.block=16", "--config.model.param_dtype=bfloat16",
                           "--config.dpo.reference=base")
    out = runs.call("rdpo_jax.train", *args, compile_cache=compile_cache)
    assert "with fresh rank-4 adapters" in out
    losses = [r["loss"] for r in runs.metrics(workdir) if "loss" in r]
    assert losses[0] == pytest.approx(np.log(2), abs=1e-6) and losses[-1] < losses[0]
    base = json.load(open(os.path.join(workdir, "base.json")))
    assert base["source"] == os.path.join(smoke_dir, "model") and "model.safetensors" in base["files"]
    # the checkpoint holds the adapters and their optimizer state, not the base
    saved = checkpoint.ocp.PyTreeCheckpointHandler().metadata(
        checkpoint.epath.Path(workdir, "checkpoints", "4", checkpoint.STATE))
    names = [optim.path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(dict(saved))[0]]
    assert not [n for n in names if n.startswith("frozen")], names
    assert all(n.endswith(lora.ADAPTER) for n in names if n.startswith("params")), names
    straight, _, folder, step = checkpoint.load_model(workdir, merge=False)
    assert step == 4
    # resumed from step 2: bitwise the same adapters (dropout draws by step, the base quantized alike)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
    runs.call("rdpo_jax.train", *args, compile_cache=compile_cache)
    resumed, _, _, _ = checkpoint.load_model(workdir, merge=False)
    for a, b in zip(_adapters(straight), _adapters(resumed)):
        np.testing.assert_array_equal(a, b)
    # a base that changed since is refused
    changed = dict(base, files=dict(base["files"], **{"model.safetensors": 1}))
    checkpoint.write_base(workdir, changed)
    with pytest.raises(ValueError, match="its adapters were trained on"):
        runs.call("rdpo_jax.train", *args, compile_cache=compile_cache)
    checkpoint.write_base(workdir, base)

    # loaded for sampling: merged into the float base, the adapted model's logits
    ids = np.asarray([[3, 9, 11, 12, 40, 41, 7, 8]], np.int32)
    adapted = np.asarray(straight(ids))
    policy = inference.load(workdir, mesh="fsdp=2")  # what sample, ref_logps, evaluate, serve and the judge read
    merged = policy.model
    assert policy.step == 4 and not nnx.state(merged, nnx.LoRAParam)
    np.testing.assert_allclose(np.asarray(merged(ids)), adapted, atol=1e-5 * np.abs(adapted).max())
    exported = str(tmp_path / "export")
    runs.call("rdpo_jax.export", f"--workdir={workdir}", f"--out={exported}", "--dtype=float32")
    torch_model = transformers.AutoModelForImageTextToText.from_pretrained(exported, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = torch_model(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(theirs, adapted, atol=1e-4 * np.abs(adapted).max())

    # the loop's next round: fresh adapters on this run merged (its step named in base.json), the reference
    # ("base") that merged policy: the first loss is log 2 again
    second = str(tmp_path / "second")
    runs.call("rdpo_jax.train", *runs.train_args(smoke_dir, second, *args[2:], "--config.total_steps=1",
                                                 f"--config.init_from={workdir}"), compile_cache=compile_cache)
    assert json.load(open(os.path.join(second, "base.json"))) == {"source": workdir, "step": 4}
    assert [r["loss"] for r in runs.metrics(second) if "loss" in r] == [pytest.approx(np.log(2), abs=1e-6)]
    on_merged, _, _, _ = checkpoint.load_model(second)  # two LoRA runs deep: merged twice (its one step's lr is 0)
    np.testing.assert_allclose(np.asarray(on_merged(ids)), adapted, atol=1e-5 * np.abs(adapted).max())
