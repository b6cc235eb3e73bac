"""Mines preference pairs from judged samples, prompt by prompt.

    python -m data_prep.make_pairs --pool=DIR/pool --judged=DIR/judged --miner=rubric --out=DIR [--name=pairs]
        [--gate=veto] [--margin=0.1] [--criterion_gap=0] [--max_pairs=2] [--dedup=0.9] [--format=pairs|groups]
    python -m data_prep.make_pairs … --miner=outcome --outcome=correct|holistic|ID   (the baseline)

Output: `pairs` records with the rubric, both answers' raw scores, the miner's metadata and, where the
samples carry them, both answers' token ids (`chosen_ids`, `rejected_ids`, `tokenizer`); with
`--format=groups`, one `groups` record per prompt instead: its pairs' distinct answers once each and the
pairs naming them (the image stored once; the trainer's multi_answer layout encodes each answer once,
the other layouts train its pairs as pairs, `data.max_pairs_per_group` ≥ --max_pairs); a summary
(pairs per prompt, margin histogram, prompts without a pair by reason) printed and saved as
`NAME.summary.json` (one per shard). Resumable, sharded over prompts.
"""

from __future__ import annotations

import collections
import os

import numpy as np
from absl import app, flags

from data_prep import common
from rdpo_jax import logs
from rdpo_jax.data import arrayrecord, records
from rdpo_jax.rubrics import aggregate, mining

_POOL = flags.DEFINE_string("pool", None, "Rubric pool dataset.", required=True)
_JUDGED = flags.DEFINE_string("judged", None, "Judged samples dataset.", required=True)
_MINER = flags.DEFINE_enum("miner", "rubric", ["rubric", "outcome"], "Pair miner.")
_GATE = flags.DEFINE_enum("gate", "veto", list(aggregate.GATES), "Essential gate of the reward.")
_MARGIN = flags.DEFINE_float("margin", 0.1, "Minimum reward gap (outcome: outcome gap).")
_CRITERION_GAP = flags.DEFINE_float("criterion_gap", 0.0, "Minimum gap on at least one criterion (0 = off).")
_MAX_PAIRS = flags.DEFINE_integer("max_pairs", 2, "Pairs per prompt at most.")
_DEDUP = flags.DEFINE_float("dedup", 0.9, "Answers at least this similar (token Jaccard) count as one.")
_OUTCOME = flags.DEFINE_string("outcome", "holistic", "Outcome miner: 'holistic' (every criterion passes), 'correct' "
                               "(the 'answer' criterion, else every essential one), or a criterion id.")
_OUT = flags.DEFINE_string("out", None, "Output folder.", required=True)
_NAME = flags.DEFINE_string("name", "pairs", "Output dataset name.")
_FORMAT = flags.DEFINE_enum("format", "pairs", ["pairs", "groups"], "One record per pair, or per prompt group.")


def token_ids(pair: mining.Pair) -> dict:
    """The pair's `chosen_ids`, `rejected_ids` and `tokenizer` where both answers carry ids of one
    tokenizer (the sampler's), else nothing (training then tokenizes the text)."""
    chosen, rejected = pair.chosen, pair.rejected
    if chosen.response_ids is None or rejected.response_ids is None or chosen.tokenizer is None \
            or chosen.tokenizer != rejected.tokenizer:
        return {}
    return dict(chosen_ids=list(chosen.response_ids), rejected_ids=list(rejected.response_ids),
                tokenizer=chosen.tokenizer)


def group(prompt_id: str, prompt: dict, pairs: list[mining.Pair]) -> dict:
    """A prompt's pairs as one `groups` record: each distinct answer (by sample) once, in order of first use."""
    answers: dict[str, int] = {}
    samples = []
    for p in pairs:
        for s in (p.chosen, p.rejected):
            if s.sample_id not in answers:
                answers[s.sample_id] = len(samples)
                samples.append(s)
    ids = all(s.response_ids is not None for s in samples) and len({s.tokenizer for s in samples}) == 1 \
        and samples[0].tokenizer is not None  # ids of one tokenizer, every answer's, or none
    entries = [dict(text=s.response, scores=s.scores, sample_id=s.sample_id,
                    **({"ids": list(s.response_ids)} if ids else {})) for s in samples]
    return dict(group_id=f"{prompt_id}/{pairs[0].chosen.policy_step}", prompt_id=prompt_id, images=prompt["images"],
                messages=prompt["messages"], rubric=prompt["rubric"], answers=entries,
                pairs=[dict(pair_id=f"{prompt_id}/{p.chosen.policy_step}/{j}", chosen=answers[p.chosen.sample_id],
                            rejected=answers[p.rejected.sample_id], meta={**p.meta, "policy_step": p.chosen.policy_step})
                       for j, p in enumerate(pairs)],
                **({"tokenizer": samples[0].tokenizer} if ids else {}))


def main(argv):
    del argv
    shard_index, num_shards = common.shard()
    pool, index = common.pool_index(_POOL.value)
    judged = arrayrecord.Source(_JUDGED.value, "samples")
    by_prompt: dict[str, list[mining.Sample]] = collections.defaultdict(list)
    for i in range(len(judged)):
        s = records.decode(judged[i][1], "samples", judged.where(i))
        ids = s.get("response_ids")
        by_prompt[s["prompt_id"]].append(mining.Sample(s["sample_id"], s["response"], s.get("scores"),
                                                       s["policy_step"], None if ids is None else tuple(ids),
                                                       s["sampler"].get("tokenizer")))
    out = common.Output(_OUT.value, _NAME.value, _FORMAT.value, shard_index, num_shards, common.CHUNK.value)
    counts = collections.Counter()
    per_prompt, margins = collections.Counter(), []
    prompts = sorted(by_prompt)[shard_index::num_shards]
    for prompt_id in logs.bar(prompts, desc="make_pairs", unit="prompt"):
        if prompt_id in out.done:
            counts["already_done"] += 1
            continue
        if prompt_id not in index:
            raise records.RecordError(_JUDGED.value, "prompt_id", f"{prompt_id!r} is not in {_POOL.value}")
        prompt = records.decode(pool[index[prompt_id]][1], "rubric_pool", pool.where(index[prompt_id]))
        rubric, samples = prompt["rubric"], by_prompt[prompt_id]
        empty = [s for s in samples if not s.response.strip()]  # a pair record cannot hold an empty answer
        if empty:
            counts["empty answers left out"] += len(empty)
            samples = [s for s in samples if s.response.strip()]
        for s in samples:
            if s.scores is not None and len(s.scores) != len(rubric["criteria"]):
                raise records.RecordError(s.sample_id, "scores", f"{len(s.scores)} scores for "
                                          f"{len(rubric['criteria'])} criteria of prompt {prompt_id}")
        if _MINER.value == "rubric":
            pairs, reason = mining.mine_rubric(rubric, samples, gate=_GATE.value, margin=_MARGIN.value,
                                               criterion_gap=_CRITERION_GAP.value, max_pairs=_MAX_PAIRS.value,
                                               dedup=_DEDUP.value)
        else:
            outcome = {"holistic": mining.holistic_outcome, "correct": mining.answer_outcome}.get(
                _OUTCOME.value, lambda r: mining.criterion_outcome(_OUTCOME.value, r))(rubric)
            pairs, reason = mining.mine_outcome(samples, outcome, margin=_MARGIN.value, max_pairs=_MAX_PAIRS.value,
                                                dedup=_DEDUP.value)
        per_prompt[len(pairs)] += 1
        if reason:
            counts[f"no pair: {reason}"] += 1
            out.mark_done(prompt_id)
        margins += [p.meta["margin"] for p in pairs]
        if pairs and _FORMAT.value == "groups":
            record = group(prompt_id, prompt, pairs)
            counts["pairs with token ids"] += len(pairs) * ("tokenizer" in record)
            counts["pairs"] += len(pairs)
            counts["groups"] += 1
            counts["answers"] += len(record["answers"])
            out.add(prompt_id, record)
            continue
        for j, p in enumerate(pairs):
            ids = token_ids(p)
            counts["pairs with token ids"] += bool(ids)
            out.add(prompt_id, dict(
                pair_id=f"{prompt_id}/{p.chosen.policy_step}/{j}", prompt_id=prompt_id, images=prompt["images"],
                messages=prompt["messages"], chosen=p.chosen.response, rejected=p.rejected.response,
                rubric=rubric, chosen_scores=p.chosen.scores, rejected_scores=p.rejected.scores,
                meta={**p.meta, "chosen_sample": p.chosen.sample_id, "rejected_sample": p.rejected.sample_id,
                      "policy_step": p.chosen.policy_step}, **ids))
            counts["pairs"] += 1
    out.close()
    hist, edges = np.histogram(margins, bins=5, range=(0.0, 1.0)) if margins else ([], [])
    report = {"prompts": len(prompts), **counts, "pairs per prompt": dict(sorted(per_prompt.items())),
              "margin histogram": {f"{edges[i]:.1f}-{edges[i + 1]:.1f}": int(h) for i, h in enumerate(hist)}}
    common.summary(f"make_pairs ({_MINER.value}), shard {shard_index}/{num_shards}", report,
                   os.path.join(_OUT.value, f"{_NAME.value}-s{shard_index:05d}-of-{num_shards:05d}.summary.json"))


if __name__ == "__main__":
    app.run(main)
