"""Builds the rubric pool: one instance-specific rubric per image–instruction pair.

    python -m data_prep.build_rubrics --input=prompts.jsonl --generator=rule --out=DIR [--name=pool]
    python -m data_prep.build_rubrics --input=prompts.jsonl --generator=openai \\
        --endpoint=http://judge:8000/v1 --model=Qwen/Qwen2.5-VL-72B-Instruct --out=DIR

Input: JSONL, one prompt per line — {"prompt_id", "images": [paths] (or "image"), "instruction" (or chat
"messages" with image parts), "reference_answer"?, "ground_truth"? (for --generator=rule; see
rdpo_jax/rubrics/generate.py)}; image paths are relative to the JSONL file. Or an `sft` dataset
(ArrayRecord path or tfds:…): its answers become reference answers (needs --generator=openai).
Output: `rubric_pool` records. Resumable, sharded (--shard_index/--num_shards).
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from data_prep import common
from rdpo_jax import logs
from rdpo_jax.data import arrayrecord, records
from rdpo_jax.rubrics import generate
from rdpo_jax.rubrics.http import ChatClient, EndpointError

_INPUT = flags.DEFINE_string("input", None, "prompts.jsonl, or an sft dataset.", required=True)
_GENERATOR = flags.DEFINE_enum("generator", "rule", ["rule", "openai"], "Rubric generator.")
_ENDPOINT = flags.DEFINE_string("endpoint", "", "OpenAI-compatible base URL (…/v1) for --generator=openai.")
_MODEL = flags.DEFINE_string("model", "", "Model name at the endpoint.")
_API_KEY_ENV = flags.DEFINE_string("api_key_env", "OPENAI_API_KEY", "Environment variable holding the API key.")
_OUT = flags.DEFINE_string("out", None, "Output folder.", required=True)
_NAME = flags.DEFINE_string("name", "pool", "Output dataset name.")


def _jsonl_items(path: str):
    base = os.path.dirname(os.path.abspath(path))
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise records.RecordError(where, "<line>", f"not JSON ({e.msg})") from None
            paths = row.get("images", [row["image"]] if "image" in row else [])
            images = []
            for p in paths:
                try:
                    with open(os.path.join(base, p), "rb") as img:
                        images.append(img.read())
                except OSError as e:
                    raise records.RecordError(where, "images", f"cannot read {p!r} ({e.strerror})") from None
            messages = row.get("messages") or [{"role": "user", "content": [{"type": "image"} for _ in images] + [
                {"type": "text", "text": row.get("instruction", "")}]}]
            if "prompt_id" not in row:
                raise records.RecordError(where, "prompt_id", "missing (required)")
            yield str(row["prompt_id"]), dict(images=images, messages=messages,
                                              reference_answer=row.get("reference_answer")), row.get("ground_truth")


def _dataset_items(spec: str):
    source = arrayrecord.Source(spec, "sft")
    for i in range(len(source)):
        record = records.decode(source[i][1], "sft", source.where(i))
        key = record.get("example_id") or f"example{i}"
        yield key, dict(images=record["images"], messages=record["messages"], reference_answer=record["answer"]), None


def main(argv):
    del argv
    shard_index, num_shards = common.shard()
    items = _jsonl_items(_INPUT.value) if _INPUT.value.endswith(".jsonl") else _dataset_items(_INPUT.value)
    out = common.Output(_OUT.value, _NAME.value, "rubric_pool", shard_index, num_shards, common.CHUNK.value)
    generator = None
    if _GENERATOR.value == "openai":
        if not _ENDPOINT.value or not _MODEL.value:
            raise app.UsageError("--generator=openai needs --endpoint and --model")
        generator = generate.OpenAIRubricGenerator(ChatClient(_ENDPOINT.value, _MODEL.value,
                                                              api_key_env=_API_KEY_ENV.value))
    counts = {"written": 0, "already_done": 0, "failed": 0}
    for n, (key, prompt, truth) in enumerate(logs.bar(items, desc="rubrics", unit="prompt")):
        if n % num_shards != shard_index:
            continue
        if key in out.done:
            counts["already_done"] += 1
            continue
        if generator is None:
            if truth is None:
                raise records.RecordError(f"{_INPUT.value} prompt {key}", "ground_truth",
                                          "missing: --generator=rule needs structured ground truth")
            rubric = generate.rule_rubric(truth)
        else:
            try:
                rubric = generator.generate(prompt["messages"], prompt["images"], prompt["reference_answer"])
            except (generate.RubricGenerationError, EndpointError) as e:  # counted and named, never silent
                counts["failed"] += 1
                print(f"{key}: no rubric ({e})")
                continue
        record = dict(prompt_id=key, images=prompt["images"], messages=prompt["messages"], rubric=rubric)
        if prompt["reference_answer"]:
            record["reference_answer"] = prompt["reference_answer"]
        out.add(key, record)
        counts["written"] += 1
    manifest = out.close()
    counts["dataset"] = f"{_OUT.value}/{_NAME.value}" if manifest else f"shard {shard_index} done; waiting for others"
    common.summary(f"build_rubrics ({_GENERATOR.value}), shard {shard_index}/{num_shards}", counts)


if __name__ == "__main__":
    app.run(main)
