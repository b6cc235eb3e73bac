"""Judges sampled answers criterion by criterion against their prompt's rubric.

    python -m data_prep.judge --pool=DIR/pool --samples=DIR/samples --judge=verifier --out=DIR [--name=judged]
    python -m data_prep.judge … --judge=openai --endpoint=http://vllm:8000/v1 --judge_model=NAME [--concurrency=16]
    python -m data_prep.judge … --judge=flax --judge_model=HF_FOLDER

Judges: `verifier` (criteria with machine checks, data with ground truth), `openai` (an OpenAI-compatible
endpoint; a server's Retry-After obeyed up to --max_retry_after seconds; API key from --api_key_env;
verdicts cached in SQLite, so a restart with the same sharding never pays twice: by default one file per
shard, OUT/NAME-s00000-of-00004.cache.sqlite, because SQLite is not safe to share between writers on a
network filesystem such as gcsfuse), `flax` (a local model). Output: the samples with `scores`, `reasons`
and `judge` — or `unscorable` with the reason, counted in the summary. Resumable, sharded over fixed batches
of samples (a shard takes whole batches of --batch_size: any sharding writes one unsharded run's verdicts).
"""

from __future__ import annotations

import collections
import os

from absl import app, flags

from data_prep import common
from rdpo_jax import logs
from rdpo_jax.data import arrayrecord, records
from rdpo_jax.rubrics import factory
from rdpo_jax.rubrics.judge import Item

_POOL = flags.DEFINE_string("pool", None, "Rubric pool dataset.", required=True)
_SAMPLES = flags.DEFINE_string("samples", None, "Samples dataset.", required=True)
_JUDGE = flags.DEFINE_enum("judge", "verifier", ["verifier", "openai", "flax"], "Which judge.")
_ENDPOINT = flags.DEFINE_string("endpoint", "", "OpenAI-compatible base URL (…/v1).")
_JUDGE_MODEL = flags.DEFINE_string("judge_model", "", "Model name at the endpoint, or the HF folder for flax.")
_API_KEY_ENV = flags.DEFINE_string("api_key_env", "OPENAI_API_KEY", "Environment variable holding the API key.")
_CONCURRENCY = flags.DEFINE_integer("concurrency", 8, "Requests in flight (openai).")
_TIMEOUT = flags.DEFINE_float("timeout", 120.0, "Seconds per request (openai).")
_CACHE = flags.DEFINE_string(
    "cache", "", "SQLite verdict cache (openai); default OUT/NAME-s{shard:05d}-of-{num_shards:05d}.cache.sqlite, "
    "one per shard (never give shards running at once the same file).")
_MAX_RETRY_AFTER = flags.DEFINE_float("max_retry_after", 60.0,
                                      "Longest wait in seconds a server's Retry-After gets (openai).")
_MESH = flags.DEFINE_string("mesh", "fsdp=-1", "The flax judge's mesh over this process's devices (see "
                            "rdpo_jax.inference: AXIS=SIZE,… over data, fsdp, tensor).")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Samples per judge call; shards take whole batches of them.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 0, "Longest verdict reply in tokens (openai, flax; 0: the judge's "
                                   "default, 1024 for openai, 512 for flax).")
_OUT = flags.DEFINE_string("out", None, "Output folder.", required=True)
_NAME = flags.DEFINE_string("name", "judged", "Output dataset name.")


def cache_path(shard_index: int, num_shards: int) -> str:
    """--cache, else this shard's own file in --out."""
    return _CACHE.value or os.path.join(
        _OUT.value, f"{_NAME.value}-s{shard_index:05d}-of-{num_shards:05d}.cache.sqlite")


def make_judge(shard_index: int, num_shards: int):
    try:
        return factory.make_judge(_JUDGE.value, model=_JUDGE_MODEL.value, endpoint=_ENDPOINT.value,
                                  api_key_env=_API_KEY_ENV.value, timeout=_TIMEOUT.value,
                                  concurrency=_CONCURRENCY.value, cache=cache_path(shard_index, num_shards),
                                  max_retry_after=_MAX_RETRY_AFTER.value, mesh=_MESH.value,
                                  max_tokens=_MAX_TOKENS.value)
    except ValueError as e:
        raise app.UsageError(f"--judge={_JUDGE.value}: {e}") from None


def main(argv):
    del argv
    shard_index, num_shards = common.shard()
    if _BATCH.value < 1:
        raise app.UsageError(f"--batch_size={_BATCH.value}: expected at least 1 sample per judge call")
    pool, index = common.pool_index(_POOL.value)
    samples = arrayrecord.Source(_SAMPLES.value, "samples")
    out = common.Output(_OUT.value, _NAME.value, "samples", shard_index, num_shards, common.CHUNK.value)
    judge = make_judge(shard_index, num_shards)
    counts = collections.Counter()
    # The samples in fixed batches of --batch_size, whole batches per shard, a partly done one judged again
    # whole (a model judge's verdicts may depend on their batch; the verdict cache answers the repeats)
    starts = range(0, len(samples), _BATCH.value)[shard_index::num_shards]
    for start in logs.bar(starts, desc="judge", unit="batch"):
        batch = [records.decode(samples[i][1], "samples", samples.where(i))
                 for i in range(start, min(start + _BATCH.value, len(samples)))]
        todo = [s["sample_id"] not in out.done for s in batch]
        counts["already_done"] += todo.count(False)
        if not any(todo):
            continue
        items = []
        for i, sample in enumerate(batch, start):
            if sample["prompt_id"] not in index:
                raise records.RecordError(samples.where(i), "prompt_id",
                                          f"{sample['prompt_id']!r} is not in {_POOL.value}")
            j = index[sample["prompt_id"]]
            prompt = records.decode(pool[j][1], "rubric_pool", pool.where(j))
            items.append(Item(sample["sample_id"], prompt["messages"], prompt["images"], prompt["rubric"],
                              sample["response"], prompt.get("reference_answer")))
        for sample, verdict, new in zip(batch, judge.judge(items), todo):
            if not new:
                continue
            sample = {**sample, "judge": judge.name}
            if verdict.unscorable is not None:
                sample["unscorable"] = verdict.unscorable
                counts["unscorable"] += 1
                counts["unscorable: " + verdict.unscorable.split(":")[0]] += 1
            else:
                sample.update(scores=verdict.scores, reasons=verdict.reasons)
                counts["scored"] += 1
            out.add(sample["sample_id"], sample)
    out.close()
    stats = dict(counts) | getattr(judge, "stats", {}) | getattr(getattr(judge, "client", None), "stats", {})
    common.summary(f"judge ({judge.name}), shard {shard_index}/{num_shards}", stats)


if __name__ == "__main__":
    app.run(main)
