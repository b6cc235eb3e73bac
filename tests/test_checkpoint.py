"""Checkpoints: restore onto another mesh shape, incomplete saves ignored, parameters-only restores."""

import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from rdpo_jax import checkpoint, optim, sharding, train_step
from rdpo_jax.models import families, hf


@pytest.fixture(scope="module")
def saved(smoke_dir, tmp_path_factory):
    cfg = hf.read_config(f"{smoke_dir}/model")
    optimizer = optim.make_optimizer(learning_rate=1e-3, weight_decay=0.1)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    _, abstract = train_step.abstract_state(families.abstract_model(cfg), optimizer, mesh, freeze=("vision_tower/.*",),
                                            reference=True)
    params = nnx.to_pure_dict(nnx.state(families.create(cfg, mesh=mesh, seed=3), nnx.Param))
    state = train_step.new_state(params, optimizer, abstract)
    run = str(tmp_path_factory.mktemp("run"))
    ck = checkpoint.Checkpointer(os.path.join(run, "checkpoints"), every=1, keep=3)
    ck.save(5, state)
    ck.wait()
    ck.close()
    return cfg, optimizer, state, run


def _equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_restore_onto_another_mesh_shape(saved):
    cfg, optimizer, state, run = saved
    mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})  # saved as 2×4, restored as 4×2
    _, abstract = train_step.abstract_state(families.abstract_model(cfg), optimizer, mesh, freeze=("vision_tower/.*",),
                                            reference=True)
    ck = checkpoint.Checkpointer(os.path.join(run, "checkpoints"), every=1, keep=3)
    restored = ck.restore(ck.latest_step(), abstract)
    kernel = restored.params["language_model"]["layers"][0]["mlp"]["up_proj"]["kernel"]
    assert kernel.sharding.mesh.shape == {"data": 1, "fsdp": 4, "expert": 1, "tensor": 2}
    assert kernel.addressable_shards[0].data.shape == (64 // 4, 128 // 2)
    _equal(restored, state)
    ck.close()


def test_incomplete_save_is_ignored(saved, tmp_path):
    *_, run = saved
    directory = tmp_path / "checkpoints"
    shutil.copytree(os.path.join(run, "checkpoints"), directory)
    # what a save killed half way leaves: orbax writes into a temporary name and renames when complete
    partial = directory / "9.orbax-checkpoint-tmp-1732406400"
    shutil.copytree(directory / "5", partial)
    shutil.rmtree(partial / "state" / "d")
    assert checkpoint.Checkpointer(str(directory), every=1, keep=3).latest_step() == 5


def test_restore_params_only_from_another_run(saved):
    cfg, _, state, run = saved
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    abstract = train_step.abstract_params(families.abstract_model(cfg), mesh)  # no optimizer, no freezing: params only
    params, step = checkpoint.restore_params(run, abstract)
    assert step == 5
    _equal(params["language_model"], state.params["language_model"])
    _equal(params["vision_tower"], state.frozen["vision_tower"])
    assert params["multi_modal_projector"]["linear_1"]["kernel"].sharding.mesh.shape["data"] == 2
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        checkpoint.restore_params(os.path.dirname(run), abstract)
