"""Samples n answers per prompt of a rubric pool from the current policy (on-policy data for a round).

    python -m data_prep.sample --pool=DIR/pool --model=HF_FOLDER_OR_RUN_DIR --n=8 --out=DIR [--name=samples]

The policy is a Hugging Face folder or a training run (its latest checkpoint). Generation runs jitted
with a KV cache on a mesh of this process's devices (--mesh; parameters split over all of them by
default, rows over data × fsdp); prompts are left-padded to a
multiple of --pad_to so that few shapes compile. Generation stops at the tokenizer's stop ids (eos, the
generation config's eos ids, the chat template's end of turn) and never emits the image placeholder
token. Output: `samples` records
(sample_id = PROMPT_ID/STEP/J) with the generated token ids (`response_ids`) and the tokenizer's
fingerprint (`sampler.tokenizer`). Resumable, sharded (--shard_index/--num_shards, or --num_shards=0 for
one shard per JAX process, joined by --distributed_auto or --distributed_coordinator/_num_processes/_process_id).

Every sharding, and a rerun after a kill, writes what one uninterrupted run writes, record for record:
batches are fixed groups of the pool's prompts (per image count, since a batch's images stack into one
array), a shard takes whole batches, a partially done batch is generated again whole and only its undone
prompts are written, and sample j of the prompt at pool index i draws from fold_in(fold_in(key(--seed), i),
j) alone.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from absl import app, flags

from data_prep import common
from rdpo_jax import inference, logs, sampling
from rdpo_jax.data import arrayrecord, records
from rdpo_jax.models import config as config_lib

_POOL = flags.DEFINE_string("pool", None, "Rubric pool dataset (folder/NAME).", required=True)
_MODEL = flags.DEFINE_string("model", None, "Policy: HF folder or run workdir.", required=True)
_N = flags.DEFINE_integer("n", 4, "Samples per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature (0 = greedy).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Top-k (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Top-p (1 = off).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "Tokens per answer at most.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Prompts per generate call.")
_PAD_TO = flags.DEFINE_integer("pad_to", 64, "Prompt lengths are padded to a multiple of this.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (folded with each prompt's pool index and sample number).")
_POLICY_STEP = flags.DEFINE_integer("policy_step", -1, "Recorded policy step (-1: the checkpoint's, else 0).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter and compute dtype.")
_MESH = flags.DEFINE_string("mesh", inference.DEFAULT_MESH, inference.MESH_HELP)
_OUT = flags.DEFINE_string("out", None, "Output folder.", required=True)
_NAME = flags.DEFINE_string("name", "samples", "Output dataset name.")


def main(argv):
    del argv
    shard_index, num_shards = common.shard()
    policy = inference.load(_MODEL.value, mesh=_MESH.value, run=config_lib.RunSettings(param_dtype=jnp.dtype(_DTYPE.value)))
    policy_step = _POLICY_STEP.value if _POLICY_STEP.value >= 0 else (policy.step or 0)
    sc = policy.sampling_config(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                                top_p=_TOP_P.value, num_samples=_N.value)
    sampler = {"model": _MODEL.value, "temperature": sc.temperature, "top_k": sc.top_k, "top_p": sc.top_p,
               "max_new_tokens": sc.max_new_tokens, "seed": _SEED.value, "tokenizer": policy.tokenizer.fingerprint}
    source = arrayrecord.Source(_POOL.value, "rubric_pool")
    out = common.Output(_OUT.value, _NAME.value, "samples", shard_index, num_shards, common.CHUNK.value)
    # One pass over the whole pool for the image counts (records are decoded again per batch, so images are
    # not all held): the batches are the pool's, whatever the shard count, and this shard takes whole ones.
    image_counts = [len(records.decode(source[i][1], "rubric_pool", source.where(i))["images"])
                    for i in range(len(source))]
    batches = sampling.batches_by_image_count(image_counts, _BATCH.value)[shard_index::num_shards]
    counts = {"prompts": 0, "samples": 0, "already_done": 0, "tokens": 0, "stopped": 0}
    t0 = time.perf_counter()
    bar = logs.bar(total=sum(map(len, batches)), desc="sample", unit="prompt")
    with jax.set_mesh(policy.mesh):
        for batch in batches:
            prompts = [records.decode(source[i][1], "rubric_pool", source.where(i)) for i in batch]
            todo = [p["prompt_id"] not in out.done for p in prompts]
            counts["already_done"] += todo.count(False)
            if any(todo):  # the whole batch again: its rows, and thus their samples, as in the first run
                keys = sampling.row_keys(jax.random.key(_SEED.value), batch, sc.num_samples)
                answers = sampling.answer(policy, prompts, sc, keys, pad_to=_PAD_TO.value)
                for prompt, row, new in zip(prompts, answers, todo):
                    if new:
                        write(out, prompt["prompt_id"], row, policy_step, sampler, counts)
            bar.update(len(batch))
    bar.close()
    out.close()
    elapsed = time.perf_counter() - t0
    counts["tokens_per_s"] = round(counts["tokens"] / elapsed, 1)
    common.summary(f"sample: {_MODEL.value} (policy step {policy_step}), shard {shard_index}/{num_shards}", counts)


def write(out: common.Output, prompt_id: str, answers: list, policy_step: int, sampler: dict, counts: dict) -> None:
    """Adds one prompt's samples (consecutively: they form one item of the output)."""
    for j, (text, ids, stopped) in enumerate(answers):
        counts["tokens"] += len(ids)
        counts["stopped"] += int(stopped)
        out.add(prompt_id, dict(prompt_id=prompt_id, sample_id=f"{prompt_id}/{policy_step}/{j}", response=text,
                                response_ids=ids, policy_step=policy_step, sampler=sampler))
    counts["prompts"] += 1
    counts["samples"] += len(answers)


if __name__ == "__main__":
    app.run(main)
