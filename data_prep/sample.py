"""Samples n answers per prompt of a rubric pool from the current policy (on-policy data for a round).

    python -m data_prep.sample --pool=DIR/pool --model=HF_FOLDER_OR_RUN_DIR --n=8 --out=DIR [--name=samples]

The policy is a Hugging Face folder or a training run (its latest checkpoint). Generation runs jitted
with a KV cache on a mesh of all local devices (batch over data × fsdp); prompts are left-padded to a
multiple of --pad_to so that few shapes compile. Output: `samples` records
(sample_id = PROMPT_ID/STEP/J). Resumable, sharded (--shard_index/--num_shards, or --num_shards=0 for
one shard per JAX process).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from absl import app, flags

from data_prep import common
from rdpo_jax import checkpoint, logs, sampling, sharding
from rdpo_jax.data import arrayrecord, images, records
from rdpo_jax.data.tokenize import ChatTokenizer

_POOL = flags.DEFINE_string("pool", None, "Rubric pool dataset (folder/NAME).", required=True)
_MODEL = flags.DEFINE_string("model", None, "Policy: HF folder or run workdir.", required=True)
_N = flags.DEFINE_integer("n", 4, "Samples per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature (0 = greedy).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Top-k (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Top-p (1 = off).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "Tokens per answer at most.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Prompts per generate call.")
_PAD_TO = flags.DEFINE_integer("pad_to", 64, "Prompt lengths are padded to a multiple of this.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (folded with the prompt batch).")
_POLICY_STEP = flags.DEFINE_integer("policy_step", -1, "Recorded policy step (-1: the checkpoint's, else 0).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter and compute dtype.")
_OUT = flags.DEFINE_string("out", None, "Output folder.", required=True)
_NAME = flags.DEFINE_string("name", "samples", "Output dataset name.")


def main(argv):
    del argv
    shard_index, num_shards = common.shard()
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices=jax.local_devices())
    dtype = jnp.dtype(_DTYPE.value)
    model, cfg, folder, step = checkpoint.load_model(_MODEL.value, mesh=mesh, dtype=dtype,
                                                      check_image_tokens=False)  # checked by ChatTokenizer
    policy_step = _POLICY_STEP.value if _POLICY_STEP.value >= 0 else (step or 0)
    tok = ChatTokenizer(folder, image_token_id=cfg.image_token_id, image_seq_len=cfg.image_seq_len)
    image_cfg = images.image_config(folder)
    stop = tuple(t for t in {tok.tokenizer.eos_token_id} if t is not None)
    sc = sampling.SamplingConfig(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                                 top_p=_TOP_P.value, stop_ids=stop, pad_id=tok.pad_id, num_samples=_N.value)
    source = arrayrecord.Source(_POOL.value, "rubric_pool")
    out = common.Output(_OUT.value, _NAME.value, "samples", shard_index, num_shards, common.CHUNK.value)
    mine = [i for i in range(len(source)) if i % num_shards == shard_index]
    counts = {"prompts": 0, "samples": 0, "already_done": 0, "tokens": 0, "stopped": 0}
    t0 = time.perf_counter()
    batch: list[dict] = []

    def run(batch):
        key = jax.random.fold_in(jax.random.key(_SEED.value), int(batch[0]["_index"]))
        answers = sampling.answer(model, tok, image_cfg, mesh, batch, sc, key, pad_to=_PAD_TO.value)
        for record, row in zip(batch, answers):
            for j, (text, n, stopped) in enumerate(row):
                counts["tokens"] += n
                counts["stopped"] += int(stopped)
                out.add(record["prompt_id"], dict(
                    prompt_id=record["prompt_id"], sample_id=f"{record['prompt_id']}/{policy_step}/{j}",
                    response=text, policy_step=policy_step,
                    sampler={"model": _MODEL.value, "temperature": sc.temperature, "top_k": sc.top_k,
                             "top_p": sc.top_p, "max_new_tokens": sc.max_new_tokens, "seed": _SEED.value}))
            counts["prompts"] += 1
            counts["samples"] += _N.value

    with jax.set_mesh(mesh):
        for i in logs.bar(mine, desc="sample", unit="prompt"):
            record = records.decode(source[i][1], "rubric_pool", source.where(i))
            if record["prompt_id"] in out.done:
                counts["already_done"] += 1
                continue
            batch.append({**record, "_index": i})
            if len(batch) == _BATCH.value:
                run(batch)
                batch = []
        if batch:
            run(batch)
    out.close()
    elapsed = time.perf_counter() - t0
    counts["tokens_per_s"] = round(counts["tokens"] / elapsed, 1)
    common.summary(f"sample: {_MODEL.value} (policy step {policy_step}), shard {shard_index}/{num_shards}", counts)


if __name__ == "__main__":
    app.run(main)
