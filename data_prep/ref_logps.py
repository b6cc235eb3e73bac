"""Adds reference log-likelihoods to pairs (or groups) records, so the trainer needs no reference model.

    python -m data_prep.ref_logps --config=configs/NAME.py[:ARG] [--config.FIELD=VALUE …] \\
        --pairs=DIR/pairs --out=DIR [--name=pairs_ref] [--batch_size=N]

Takes the training config — the same file and overrides as `python -m rdpo_jax.train` — so the
reference model (the run's initial model: `model.path`, or `init_from`), its parameter and compute
dtypes, the pair layout, the length buckets, the answer length and the tokenization are the trainer's
own. Writes `ref_chosen_logp`, `ref_rejected_logp` (sums over answer tokens; a groups record's per pair,
into its `pairs` entries), `ref_fingerprint` (the
model's identity) and `ref_settings` (those config fields, `pipeline.REFERENCE_SETTINGS`); the trainer
refuses data from another model or with other settings, naming the field. Runs on the config's mesh
over this process's devices (an FSDP mesh of them if the config's does not fit); resumable, sharded over
fixed batches of --batch_size records (--num_shards=0: one shard per JAX process, joined as the config's
`distributed` group says): any sharding, and a rerun after a kill, writes every record the values one
uninterrupted run gives it, to the bit.
"""

from __future__ import annotations

import collections
import os

import jax
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from data_prep import common
from rdpo_jax import checkpoint, inference, logps, logs
from rdpo_jax.data import arrayrecord, pipeline, records
from rdpo_jax.models import config as config_lib
from rdpo_jax.models import image_inputs

_CONFIG = config_flags.DEFINE_config_file("config", None, "The training config (configs/NAME.py[:ARG]).",
                                          lock_config=True)
_PAIRS = flags.DEFINE_string("pairs", None, "Pairs (or groups) dataset.", required=True)
_BATCH = flags.DEFINE_integer("batch_size", 0, "Records per forward (0: the config's data.batch_size; a multiple "
                              "of the mesh's data × fsdp).")
_OUT = flags.DEFINE_string("out", None, "Output folder.", required=True)
_NAME = flags.DEFINE_string("name", "pairs_ref", "Output dataset name.")


def main(argv):
    del argv
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required: the training config these pairs are for")
    if config.objective != "dpo":
        raise app.UsageError(f"--config: objective {config.objective!r}; reference log-likelihoods are for 'dpo'")
    shard_index, num_shards = common.shard(config.distributed)
    reference = checkpoint.reference_model(config)
    policy = inference.load(reference, mesh=dict(config.mesh), run=config_lib.RunSettings.from_config(config),
                            model_path=config.model.path)
    fingerprint, settings = checkpoint.fingerprint(reference), pipeline.reference_settings(config)
    options = pipeline.Options.from_config(config)
    source = arrayrecord.Source(_PAIRS.value)
    kind = pipeline.source_kind(source, options)
    key = "group_id" if kind == "groups" else "pair_id"
    out = common.Output(_OUT.value, _NAME.value, kind, shard_index, num_shards, common.CHUNK.value)
    # Batch b of the input is records [b·B, (b+1)·B), the same for every shard count and rerun (a record's
    # value depends on its batch: bucket, packing, shapes); this shard takes batches b ≡ shard_index (mod
    # num_shards) from the first that holds an undone record. Indices are positions in `source` throughout.
    B = _BATCH.value or config.data.batch_size
    dataset = pipeline.make_dataset(source, options, policy.tokenizer, image_inputs.from_config(config, policy.config),
                                    global_batch_size=B, seed=None, num_epochs=1, process_index=0, process_count=1)

    def positions(b: int) -> range:
        return range(b * B, min((b + 1) * B, len(source)))

    mine = range(shard_index, len(dataset), num_shards)
    start = next((b for b in mine if any(_key(source, i, kind, key) not in out.done for i in positions(b))),
                 len(dataset))
    counts = collections.Counter(already_done=sum(len(positions(b)) for b in mine if b < start))
    todo = dataset[start::num_shards]
    layout = config.dpo.pair_layout
    forward = nnx.jit(lambda m, b: logps.pair_logps(m, b, layout=layout))
    mesh = policy.mesh
    with jax.set_mesh(mesh):
        for b, element in zip(range(start, len(dataset), num_shards),
                              logs.bar(todo, desc="ref_logps", unit="batch", total=len(todo))):
            batch = element["batch"]
            global_batch = pipeline.to_global(batch, batch.shardings(mesh))
            values = jax.device_get(forward(policy.model, global_batch))
            index = element["index"].reshape(len(element["index"]), -1)  # [rows, records per row]
            slots = {k: values[k].reshape(len(index), index.shape[1], -1) for k in ("chosen_logp", "rejected_logp")}
            where = {int(i): rs for rs, i in np.ndenumerate(index) if i >= 0}  # source position → (row, segment)
            for i in sorted(where):  # in input order, whatever rows the batch packed them into
                record = records.decode(source[i][1], kind, source.where(i))
                if record[key] in out.done:
                    counts["already_done"] += 1
                    continue
                row, segment = where[i]
                for j, pair in enumerate(record["pairs"] if kind == "groups" else [record]):
                    pair.update(ref_chosen_logp=float(slots["chosen_logp"][row, segment, j]),
                                ref_rejected_logp=float(slots["rejected_logp"][row, segment, j]))
                    counts["pairs"] += 1
                record.update(ref_fingerprint=fingerprint, ref_settings=settings)
                out.add(record[key], record)
            # records the pipeline skipped as bad (data.on_bad_record="skip") are counted by reason and done:
            # they are not in the output, and a rerun does not compute their batch again for them
            for skipped in sorted({_key(source, i, kind, key) for i in positions(b) if i not in where} - out.done):
                out.mark_done(skipped)
            for name, n in element["stats"].items():
                if name.startswith("skipped/") and n:
                    counts[name] += int(n)
            counts["truncated_answers"] += int(element["stats"]["truncated_answers"])
    out.close()
    common.summary(f"ref_logps ({fingerprint}), shard {shard_index}/{num_shards}", dict(counts),
                   os.path.join(_OUT.value, f"{out.prefix}.summary.json"))


def _key(source: arrayrecord.Source, i: int, kind: str, key: str) -> str:
    """The item key (pair_id or group_id) of record `i` of `source`."""
    return records.decode(source[i][1], kind, source.where(i))[key]


if __name__ == "__main__":
    app.run(main)
