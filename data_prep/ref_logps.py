"""Adds reference log-likelihoods to pair records, so the trainer needs no reference model.

    python -m data_prep.ref_logps --pairs=DIR/pairs --model=HF_FOLDER_OR_RUN_DIR --out=DIR [--name=pairs_ref] \\
        [--seq_buckets=1024,2048] [--max_answer_len=512] [--batch_size=8]

Uses the trainer's own pipeline and shared-prefix forward: the same tokenization, image preprocessing,
truncation and packing, so `--seq_buckets`/`--max_answer_len` must be those of the training config (they
are recorded in each pair's meta). Writes `ref_chosen_logp`, `ref_rejected_logp` (sums over answer
tokens) and `ref_fingerprint` (the model's identity; the trainer refuses data from another reference).
Runs on a mesh of all local devices; resumable, sharded over pairs (--num_shards=0: per JAX process).
"""

from __future__ import annotations

import collections

import jax
from absl import app, flags
from flax import nnx

from data_prep import common
from rdpo_jax import checkpoint, logs, packing, sharding, train_step
from rdpo_jax.data import arrayrecord, images, pipeline, records
from rdpo_jax.data.tokenize import ChatTokenizer

_PAIRS = flags.DEFINE_string("pairs", None, "Pairs dataset.", required=True)
_MODEL = flags.DEFINE_string("model", None, "Reference model: HF folder or run workdir.", required=True)
_BUCKETS = flags.DEFINE_list("seq_buckets", ["1024", "2048"], "Row lengths, as in the training config.")
_MAX_ANSWER = flags.DEFINE_integer("max_answer_len", 512, "Answer truncation, as in the training config.")
_MAX_CRITERIA = flags.DEFINE_integer("max_criteria", 16, "As in the training config.")
_IMAGES = flags.DEFINE_integer("images_per_example", 1, "As in the training config.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Pairs per forward (a multiple of the local devices).")
_OUT = flags.DEFINE_string("out", None, "Output folder.", required=True)
_NAME = flags.DEFINE_string("name", "pairs_ref", "Output dataset name.")


class _ShardSource:
    """Shard `i` of `n` of a source (grain-style random access), keeping the original indices."""

    def __init__(self, source, indices):
        self.source, self.indices = source, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.source[self.indices[int(i)]]

    def where(self, i):
        return self.source.where(self.indices[int(i)])


def main(argv):
    del argv
    shard_index, num_shards = common.shard()
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices=jax.local_devices())
    model, cfg, folder, _ = checkpoint.load_model(_MODEL.value, mesh=mesh,
                                                   check_image_tokens=False)  # checked by ChatTokenizer
    fingerprint = checkpoint.fingerprint(_MODEL.value)
    options = pipeline.Options(kind="pairs", seq_buckets=tuple(int(b) for b in _BUCKETS.value),
                               max_answer_len=_MAX_ANSWER.value, images_per_example=_IMAGES.value,
                               max_criteria=_MAX_CRITERIA.value)
    tok = ChatTokenizer(folder, image_token_id=cfg.image_token_id, image_seq_len=cfg.image_seq_len)
    source = arrayrecord.Source(_PAIRS.value, "pairs")
    out = common.Output(_OUT.value, _NAME.value, "pairs", shard_index, num_shards, common.CHUNK.value)
    todo = []
    for i in range(shard_index, len(source), num_shards):
        record = records.decode(source[i][1], "pairs", source.where(i))
        if record["pair_id"] not in out.done:
            todo.append(i)
    dataset = pipeline.make_dataset(_ShardSource(source, todo), options, tok,
                                    images.image_config(folder) if _IMAGES.value else None,
                                    local_batch_size=_BATCH.value, seed=0, num_epochs=1, process_index=0,
                                    process_count=1)
    forward = nnx.jit(lambda m, b, p: packing.pair_logps(m, b, p, layout="shared_prefix"))
    counts = collections.Counter()
    counts["already_done"] = len(range(shard_index, len(source), num_shards)) - len(todo)
    with jax.set_mesh(mesh):
        for element in logs.bar(dataset, desc="ref_logps", unit="batch", total=len(dataset)):
            batch = element["batch"]
            global_batch = pipeline.to_global(batch, train_step.batch_shardings(batch, mesh))
            logps = jax.device_get(forward(model, global_batch, global_batch.get("pixel_values")))
            for row, i in enumerate(element["index"]):
                if i < 0:
                    continue
                original = todo[int(i)]
                record = records.decode(source[original][1], "pairs", source.where(original))
                record.update(ref_chosen_logp=float(logps["chosen_logp"][row]),
                              ref_rejected_logp=float(logps["rejected_logp"][row]), ref_fingerprint=fingerprint)
                record["meta"] = {**record["meta"], "ref_max_answer_len": _MAX_ANSWER.value}
                out.add(record["pair_id"], record)
                counts["pairs"] += 1
            counts["truncated_answers"] += int(element["stats"]["truncated_answers"])
    out.close()
    common.summary(f"ref_logps ({fingerprint}), shard {shard_index}/{num_shards}", dict(counts))


if __name__ == "__main__":
    app.run(main)
