"""Adds reference log-likelihoods to pairs (or groups) records, so the trainer needs no reference model.

    python -m rdpo_jax.data_prep.ref_logps --config=rdpo_jax/configs/NAME.py[:ARG] [--config.FIELD=VALUE …] \\
        --pairs=DIR/pairs --out=DIR [--name=pairs_ref] [--batch_size=N]

Takes the training config — the same file and overrides as `python -m rdpo_jax.train` — so the
reference model (the run's initial model: `model.path`, or `init_from`), its parameter and compute
dtypes, the pair layout, the length buckets, the answer length and the tokenization are the trainer's
own. Writes `ref_chosen_logp`, `ref_rejected_logp` (sums over answer tokens; a groups record's per pair,
into its `pairs` entries), `ref_fingerprint` (the
model's identity) and `ref_settings` (those config fields, `pipeline.REFERENCE_SETTINGS`); the trainer
refuses data from another model or with other settings, naming the field. Runs on the config's mesh
over this process's devices (an FSDP mesh of them if the config's does not fit); resumable, sharded over
pairs (--num_shards=0: one shard per JAX process).
"""

from __future__ import annotations

import collections

import jax
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from rdpo_jax.data_prep import common
from rdpo_jax import checkpoint, inference, logs, packing, train_step
from rdpo_jax.data import arrayrecord, image_inputs, pipeline, records
from rdpo_jax.models import config as config_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "The training config (rdpo_jax/configs/NAME.py[:ARG]).",
                                          lock_config=True)
_PAIRS = flags.DEFINE_string("pairs", None, "Pairs (or groups) dataset.", required=True)
_BATCH = flags.DEFINE_integer("batch_size", 0, "Records per forward (0: the config's data.batch_size; a multiple "
                              "of the mesh's data × fsdp).")
_OUT = flags.DEFINE_string("out", None, "Output folder.", required=True)
_NAME = flags.DEFINE_string("name", "pairs_ref", "Output dataset name.")


class _ShardSource:
    """Shard `i` of `n` of a source (grain-style random access), keeping the original indices."""

    def __init__(self, source, indices):
        self.source, self.indices, self.kind = source, indices, source.kind

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.source[self.indices[int(i)]]

    def where(self, i):
        return self.source.where(self.indices[int(i)])


def main(argv):
    del argv
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required: the training config these pairs are for")
    if config.objective != "dpo":
        raise app.UsageError(f"--config: objective {config.objective!r}; reference log-likelihoods are for 'dpo'")
    shard_index, num_shards = common.shard()
    reference = checkpoint.reference_model(config)
    policy = inference.load(reference, mesh=dict(config.mesh), run=config_lib.RunSettings.from_config(config),
                            model_path=config.model.path)
    fingerprint, settings = checkpoint.fingerprint(reference), pipeline.reference_settings(config)
    options = pipeline.Options.from_config(config)
    source = arrayrecord.Source(_PAIRS.value)
    kind = pipeline.source_kind(source, options)
    key = "group_id" if kind == "groups" else "pair_id"
    out = common.Output(_OUT.value, _NAME.value, kind, shard_index, num_shards, common.CHUNK.value)
    todo = []
    for i in range(shard_index, len(source), num_shards):
        record = records.decode(source[i][1], kind, source.where(i))
        if record[key] not in out.done:
            todo.append(i)
    dataset = pipeline.make_dataset(
        _ShardSource(source, todo), options, policy.tokenizer,
        image_inputs.from_config(config, policy.config),
        global_batch_size=_BATCH.value or config.data.batch_size, seed=None, num_epochs=1, process_index=0,
        process_count=1)
    layout = config.dpo.pair_layout
    forward = nnx.jit(lambda m, b: packing.pair_logps(m, b, layout=layout))
    counts = collections.Counter()
    counts["already_done"] = len(range(shard_index, len(source), num_shards)) - len(todo)
    mesh = policy.mesh
    with jax.set_mesh(mesh):
        for element in logs.bar(dataset, desc="ref_logps", unit="batch", total=len(dataset)):
            batch = element["batch"]
            global_batch = pipeline.to_global(batch, train_step.batch_shardings(batch, mesh))
            logps = jax.device_get(forward(policy.model, global_batch))
            index = element["index"].reshape(len(element["index"]), -1)  # [rows, records per row]
            slots = {k: logps[k].reshape(len(index), index.shape[1], -1) for k in ("chosen_logp", "rejected_logp")}
            for (row, segment), i in np.ndenumerate(index):
                if i < 0:
                    continue
                original = todo[int(i)]
                record = records.decode(source[original][1], kind, source.where(original))
                for j, pair in enumerate(record["pairs"] if kind == "groups" else [record]):
                    pair.update(ref_chosen_logp=float(slots["chosen_logp"][row, segment, j]),
                                ref_rejected_logp=float(slots["rejected_logp"][row, segment, j]))
                    counts["pairs"] += 1
                record.update(ref_fingerprint=fingerprint, ref_settings=settings)
                out.add(record[key], record)
            counts["truncated_answers"] += int(element["stats"]["truncated_answers"])
    out.close()
    common.summary(f"ref_logps ({fingerprint}), shard {shard_index}/{num_shards}", dict(counts))


if __name__ == "__main__":
    app.run(main)
