"""Held-out rubric report of a model: `python -m rdpo_jax.evaluate --model=RUN_OR_HF --pool=POOL --out=DIR`.

    python -m rdpo_jax.evaluate --model=runs/dpo --pool=data/heldout_pool --out=runs/dpo/eval
    python -m rdpo_jax.evaluate --model=runs/sft,runs/dpo --out=eval/sft,eval/dpo --pool=…  # one process
    python -m rdpo_jax.evaluate --model=exports/dpo --pool=… --judge=openai --endpoint=… --judge_model=…

Answers every prompt of a rubric pool greedily (the sampler of `rdpo_jax.data_prep.sample`: stopping at the
tokenizer's stop ids, never emitting the image token; prompts with and without images alike), judges the
answers criterion by criterion (verifier, OpenAI-compatible endpoint or local Flax judge) and reports:

  essential_pass     share of answers passing every essential criterion
  rubric_score       weighted mean of normalized criterion scores (the rubric weights)
  hallucination      share of answers failing a pitfall criterion (a `not_contains` check: "does not
                     mention a …, which is not there"), among prompts whose rubric has one
  accuracy           final-answer correctness (the `answer` criterion, else every essential one);
                     also per prompt group (`--group=prefix`: the prompt id up to its first "-")
  words              mean answer length in words (as the length criteria count them)
Writes DIR/answers.jsonl (answer, scores, reasons per prompt) and DIR/metrics.json.
"""

from __future__ import annotations

import collections
import json
import os
import time

import jax
import numpy as np
from absl import app, flags, logging

from rdpo_jax import inference, sampling
from rdpo_jax.data import arrayrecord, records
from rdpo_jax.rubrics import aggregate, mining
from rdpo_jax.rubrics.factory import make_judge
from rdpo_jax.rubrics.judge import Item
from rdpo_jax.rubrics.prompt import instruction_text
from rdpo_jax.rubrics.verifier import split_words

METRICS = ("essential_pass", "rubric_score", "hallucination", "accuracy", "words")


def _is_pitfall(criterion: dict) -> bool:
    return criterion.get("check", {}).get("type") == "not_contains"


def score(rubric: dict, scores: list[float], answer: str) -> dict:
    """One judged answer's numbers (see the module doc)."""
    s = records.normalized_scores(rubric, scores)
    weights = [c["weight"] for c in rubric["criteria"]]
    pitfalls = [v for v, c in zip(s, rubric["criteria"]) if _is_pitfall(c)]
    out = dict(essential_pass=float(aggregate.essential_pass(rubric, s)),
               rubric_score=float(np.dot(s, weights) / sum(weights)), accuracy=mining.correctness(rubric, s),
               words=float(len(split_words(answer))))
    if pitfalls:
        out["hallucination"] = float(any(v < aggregate.PASS for v in pitfalls))
    return out


def summarize(rows: list[dict], group: str = "none") -> dict:
    """Means over the judged rows (and per group); counts of judged and unscorable answers."""
    judged = [r for r in rows if "metrics" in r]
    out: dict = {"prompts": len(rows), "unscorable": len(rows) - len(judged)}

    def means(subset):
        m = {}
        for k in METRICS:
            values = [r["metrics"][k] for r in subset if k in r["metrics"]]
            if values:
                m[k] = float(np.mean(values))
        return m

    out.update(means(judged))
    if group == "prefix":
        groups = collections.defaultdict(list)
        for r in judged:
            groups[r["prompt_id"].split("-")[0]].append(r)
        out["groups"] = {g: {"prompts": len(v), **means(v)} for g, v in sorted(groups.items())}
    return out


def evaluate(model_source: str, pool: str, out: str, *, judge, max_new_tokens: int = 128, batch_size: int = 32,
             pad_to: int = 64, group: str = "none", limit: int = 0, mesh: str = inference.DEFAULT_MESH) -> dict:
    """Answers, judges and summarizes (see the module doc); returns the metrics written to out/metrics.json."""
    policy = inference.load(model_source, mesh=mesh)
    sc = policy.sampling_config(max_new_tokens=max_new_tokens, temperature=0.0, num_samples=1)
    source = arrayrecord.Source(pool, "rubric_pool")
    n = min(len(source), limit) if limit else len(source)
    prompts = [records.decode(source[i][1], "rubric_pool", source.where(i)) for i in range(n)]
    t0 = time.perf_counter()
    answers = [""] * n
    with jax.set_mesh(policy.mesh):  # batches of one image count each (their images stack); answers in pool order
        for batch in sampling.batches_by_image_count([len(p["images"]) for p in prompts], batch_size):
            rows = sampling.answer(policy, [prompts[i] for i in batch], sc, jax.random.key(0), pad_to=pad_to)
            for i, row in zip(batch, rows):
                answers[i] = row[0][0]
    seconds = time.perf_counter() - t0
    verdicts = judge.judge([Item(p["prompt_id"], p["messages"], p["images"], p["rubric"], a,
                                 p.get("reference_answer")) for p, a in zip(prompts, answers)])
    rows = []
    for p, a, v in zip(prompts, answers, verdicts):
        row = dict(prompt_id=p["prompt_id"], instruction=instruction_text(p["messages"]), answer=a)
        if v.unscorable is not None:
            row["unscorable"] = v.unscorable
        else:
            row.update(scores=v.scores, reasons=v.reasons, criteria=[c["id"] for c in p["rubric"]["criteria"]],
                       metrics=score(p["rubric"], v.scores, a))
        rows.append(row)
    metrics = summarize(rows, group)
    metrics.update(model=model_source, step=policy.step, pool=pool, judge=judge.name, generate_seconds=round(seconds, 2))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "answers.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    return metrics


def format_metrics(metrics: dict) -> str:
    lines = [f"{metrics['model']} (step {metrics['step']}) on {metrics['pool']}: {metrics['prompts']} prompts, "
             f"{metrics['unscorable']} unscorable, judge {metrics['judge']}"]
    lines += [f"  {k:<15} {metrics[k]:.3f}" for k in METRICS if k in metrics]
    for g, m in metrics.get("groups", {}).items():
        lines.append(f"  {g:<15} accuracy {m.get('accuracy', float('nan')):.3f} over {m['prompts']}")
    return "\n".join(lines)


def _define_flags() -> None:
    flags.DEFINE_list("model", None, "HF folders or training run directories (latest checkpoint), comma-separated.")
    flags.DEFINE_string("pool", None, "Held-out rubric pool dataset (folder/NAME).")
    flags.DEFINE_list("out", None, "Output folder per model (answers.jsonl, metrics.json), comma-separated.")
    flags.DEFINE_enum("judge", "verifier", ["verifier", "openai", "flax"], "Which judge.")
    flags.DEFINE_string("judge_model", "", "Model name at the endpoint, or the judge's HF folder (flax).")
    flags.DEFINE_string("endpoint", "", "OpenAI-compatible base URL (…/v1).")
    flags.DEFINE_string("api_key_env", "OPENAI_API_KEY", "Environment variable holding the API key.")
    flags.DEFINE_integer("max_new_tokens", 128, "Tokens per answer at most.")
    flags.DEFINE_integer("batch_size", 32, "Prompts per generate call.")
    flags.DEFINE_enum("group", "none", ["none", "prefix"], "Per-group accuracy by prompt-id prefix.")
    flags.DEFINE_integer("limit", 0, "Evaluate the first N prompts only (0: all).")
    flags.DEFINE_string("mesh", inference.DEFAULT_MESH, inference.MESH_HELP)


def main(argv):
    del argv
    f = flags.FLAGS
    if not f.model or not f.pool or not f.out:
        raise app.UsageError("--model, --pool and --out are required")
    if len(f.model) != len(f.out):
        raise app.UsageError(f"--out names {len(f.out)} folders for {len(f.model)} models; give one per model")
    if not f["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    try:
        judge = make_judge(f.judge, model=f.judge_model, endpoint=f.endpoint, api_key_env=f.api_key_env,
                           cache=os.path.join(f.out[0], "verdicts.cache.sqlite"), mesh=f.mesh)
    except ValueError as e:
        raise app.UsageError(f"--judge={f.judge}: {e}") from None
    for model, out in zip(f.model, f.out):  # one process: the sampler compiles once for all of them
        metrics = evaluate(model, f.pool, out, judge=judge, max_new_tokens=f.max_new_tokens,
                           batch_size=f.batch_size, group=f.group, limit=f.limit, mesh=f.mesh)
        print(format_metrics(metrics))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
