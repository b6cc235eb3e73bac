"""Held-out rubric report of a model: `python -m rdpo_jax.evaluate --model=RUN_OR_HF --pool=POOL --out=DIR`.

    python -m rdpo_jax.evaluate --model=runs/dpo --pool=data/heldout_pool --out=runs/dpo/eval
    python -m rdpo_jax.evaluate --model=runs/sft,runs/dpo --out=eval/sft,eval/dpo --pool=…  # one process
    python -m rdpo_jax.evaluate --model=exports/dpo --pool=… --judge=openai --endpoint=… --judge_model=…

Answers every prompt of a rubric pool greedily (the sampler of `data_prep.sample`: stopping at the
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

`--samples=N` also draws N answers per prompt at `--temperature` (default 1, seeded by `--seed`) and
reports the same numbers over them under `sampled` in metrics.json (their answers in
DIR/sampled_answers.jsonl): what the policy says when it samples — what the next on-policy round mines
from — where the greedy answer shows only its most likely one.
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
    """Means over the judged rows (and per group); counts of prompts, answers (with several per prompt) and
    unscorable answers."""
    judged = [r for r in rows if "metrics" in r]
    out: dict = {"prompts": len({r["prompt_id"] for r in rows}), "unscorable": len(rows) - len(judged)}
    if len(rows) > out["prompts"]:
        out["answers"] = len(rows)

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
        out["groups"] = {g: {"prompts": len({r["prompt_id"] for r in v}), **means(v)} for g, v in sorted(groups.items())}
    return out


def _answers(policy, prompts: list[dict], sc, key: jax.Array, batch_size: int, pad_to: int) -> list[list[str]]:
    """`sc.num_samples` answers per prompt, in pool order; sample j of prompt i draws from
    fold_in(fold_in(key, i), j), so the answers do not depend on how prompts are batched."""
    answers: list[list[str]] = [[] for _ in prompts]
    with jax.set_mesh(policy.mesh):  # batches of one image count each (their images stack)
        for batch in sampling.batches_by_image_count([len(p["images"]) for p in prompts], batch_size):
            keys = sampling.row_keys(key, batch, sc.num_samples)
            for i, row in zip(batch, sampling.answer(policy, [prompts[i] for i in batch], sc, keys, pad_to=pad_to)):
                answers[i] = [text for text, _, _ in row]
    return answers


def _judged(judge, prompts: list[dict], answers: list[list[str]]) -> list[dict]:
    """One row per answer: the answer, its verdicts and its numbers (`sample` when a prompt has several)."""
    flat = [(p, j, a) for p, row in zip(prompts, answers) for j, a in enumerate(row)]
    verdicts = judge.judge([Item(p["prompt_id"], p["messages"], p["images"], p["rubric"], a,
                                 p.get("reference_answer")) for p, _, a in flat])
    rows = []
    for (p, j, a), v in zip(flat, verdicts):
        row = dict(prompt_id=p["prompt_id"], instruction=instruction_text(p["messages"]), answer=a)
        if len(answers[0]) > 1:
            row["sample"] = j
        if v.unscorable is not None:
            row["unscorable"] = v.unscorable
        else:
            row.update(scores=v.scores, reasons=v.reasons, criteria=[c["id"] for c in p["rubric"]["criteria"]],
                       metrics=score(p["rubric"], v.scores, a))
        rows.append(row)
    return rows


def _write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _check_sampling(samples: int, temperature: float) -> None:
    if samples < 0 or (samples and temperature <= 0):
        raise ValueError(f"samples={samples}, temperature={temperature}: sampled answers need samples ≥ 1 and a "
                         "temperature > 0 (samples=0 reports the greedy answers only)")


def evaluate(model_source: str, pool: str, out: str, *, judge, max_new_tokens: int = 128, batch_size: int = 32,
             pad_to: int = 64, group: str = "none", limit: int = 0, mesh: str = inference.DEFAULT_MESH,
             samples: int = 0, temperature: float = 1.0, seed: int = 0) -> dict:
    """Answers, judges and summarizes (see the module doc); returns the metrics written to out/metrics.json.
    `samples` > 0 also draws that many answers per prompt at `temperature` (PRNG seed `seed`) and reports
    their numbers under `sampled`."""
    _check_sampling(samples, temperature)
    policy = inference.load(model_source, mesh=mesh)
    source = arrayrecord.Source(pool, "rubric_pool")
    n = min(len(source), limit) if limit else len(source)
    prompts = [records.decode(source[i][1], "rubric_pool", source.where(i)) for i in range(n)]
    t0 = time.perf_counter()
    greedy = policy.sampling_config(max_new_tokens=max_new_tokens, temperature=0.0, num_samples=1)
    rows = _judged(judge, prompts, _answers(policy, prompts, greedy, jax.random.key(0), batch_size, pad_to))
    metrics = summarize(rows, group)
    metrics.update(model=model_source, step=policy.step, pool=pool, judge=judge.name,
                   generate_seconds=round(time.perf_counter() - t0, 2))
    os.makedirs(out, exist_ok=True)
    if samples:
        sc = policy.sampling_config(max_new_tokens=max_new_tokens, temperature=temperature, num_samples=samples)
        sampled = _judged(judge, prompts, _answers(policy, prompts, sc, jax.random.key(seed), batch_size, pad_to))
        metrics["sampled"] = dict(summarize(sampled, group), samples=samples, temperature=temperature, seed=seed)
        _write_jsonl(os.path.join(out, "sampled_answers.jsonl"), sampled)
    _write_jsonl(os.path.join(out, "answers.jsonl"), rows)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    return metrics


def format_metrics(metrics: dict) -> str:
    lines = [f"{metrics['model']} (step {metrics['step']}) on {metrics['pool']}: {metrics['prompts']} prompts, "
             f"{metrics['unscorable']} unscorable, judge {metrics['judge']}"]
    lines += [f"  {k:<15} {metrics[k]:.3f}" for k in METRICS if k in metrics]
    for g, m in metrics.get("groups", {}).items():
        lines.append(f"  {g:<15} accuracy {m.get('accuracy', float('nan')):.3f} over {m['prompts']}")
    sampled = metrics.get("sampled")
    if sampled:
        lines.append(f"  sampled ({sampled['samples']} per prompt at temperature {sampled['temperature']:g}):")
        lines += [f"    {k:<13} {sampled[k]:.3f}" for k in METRICS if k in sampled]
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
    flags.DEFINE_integer("samples", 0, "Also sample this many answers per prompt and report them under `sampled` "
                         "(0: greedy answers only). A generate call then holds batch_size × samples rows.")
    flags.DEFINE_float("temperature", 1.0, "Temperature of the sampled answers (--samples).")
    flags.DEFINE_integer("seed", 0, "PRNG seed of the sampled answers (--samples).")


def main(argv):
    del argv
    f = flags.FLAGS
    if not f.model or not f.pool or not f.out:
        raise app.UsageError("--model, --pool and --out are required")
    if len(f.model) != len(f.out):
        raise app.UsageError(f"--out names {len(f.out)} folders for {len(f.model)} models; give one per model")
    try:
        _check_sampling(f.samples, f.temperature)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    if not f["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    try:
        judge = make_judge(f.judge, model=f.judge_model, endpoint=f.endpoint, api_key_env=f.api_key_env,
                           cache=os.path.join(f.out[0], "verdicts.cache.sqlite"), mesh=f.mesh)
    except ValueError as e:
        raise app.UsageError(f"--judge={f.judge}: {e}") from None
    for model, out in zip(f.model, f.out):  # one process: the sampler compiles once for all of them
        metrics = evaluate(model, f.pool, out, judge=judge, max_new_tokens=f.max_new_tokens,
                           batch_size=f.batch_size, group=f.group, limit=f.limit, mesh=f.mesh,
                           samples=f.samples, temperature=f.temperature, seed=f.seed)
        print(format_metrics(metrics))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
