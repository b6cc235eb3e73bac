"""The demo's results: a Markdown table (printed and saved as results.md) and report.html with training
curves, the table and example scenes with base vs trained answers and per-criterion verdicts."""

from __future__ import annotations

import base64
import html
import io
import json
import os

import numpy as np

from rdpo_jax.data import arrayrecord
from rdpo_jax.loop import summary

# (metrics key, header). evaluate's overall `accuracy` is left out: in this world it equals the essential
# pass rate (a short question's one essential criterion is its answer; a description's accuracy is all of
# its essentials), so the table shows accuracy per question kind only.
COLUMNS = [("essential_pass", "essential pass"), ("rubric_score", "rubric score"),
           ("hallucination", "hallucination"), ("words", "words"), *summary.SAMPLED]
COMPARED = [k for k, _ in COLUMNS if k != "words"]  # the metrics the paper's ordering is read on


def _values(row: dict, key: str) -> list[float]:
    """The row's metric per seed."""
    return [v for m in row["metrics"] if (v := summary.metric(m, key)) is not None]


def _cell(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def results(specs: list[dict]) -> list[dict]:
    """Per row spec (name; eval dirs, run dirs and pairs manifests, one per seed; pairs None for the base):
    the row with its metrics per seed and the number of pairs each run trained on."""
    rows = []
    for spec in specs:
        metrics = [summary.load_json(os.path.join(d, "metrics.json")) for d in spec["evals"]]
        pairs = None if spec["pairs"] is None else [p["count"] for p in map(summary.load_json, spec["pairs"]) if p]
        rows.append({**spec, "metrics": [m for m in metrics if m], "pairs": pairs})
    return rows


def table(rows: list[dict]) -> str:
    groups = sorted({g for r in rows for m in r["metrics"] for g in m.get("groups", {})})
    head = ["model", "pairs"] + [h for _, h in COLUMNS] + [f"acc: {g}" for g in groups]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"], "–" if r["pairs"] is None else "/".join(map(str, r["pairs"]))]
        cells += [_cell(_values(r, k)) for k, _ in COLUMNS]
        cells += [_cell([m["groups"][g]["accuracy"] for m in r["metrics"] if g in m.get("groups", {})])
                  for g in groups]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The paper's ordering to test: (better arm, worse row) — rubric-filtered pairs beat the SFT base and
# outcome-filtered pairs; the rubric loss at least matches rubric pairs with the sigmoid loss.
COMPARISONS = [("rubric+sigmoid", "base (SFT)"), ("rubric+rubric", "base (SFT)"),
               ("rubric+sigmoid", "outcome+sigmoid"), ("rubric+rubric", "outcome+sigmoid"),
               ("rubric+rubric", "rubric+sigmoid"), ("outcome+sigmoid", "base (SFT)")]
LOWER_IS_BETTER = {"hallucination", "sampled/hallucination"}


def final_rows(rows: list[dict]) -> dict[str, dict]:
    """Each arm's row after its last round, and the base, by arm name."""
    out = {}
    for r in rows:
        out[r.get("arm") or r["name"]] = r  # rows come round by round: the last one stays
    return out


def comparisons(rows: list[dict]) -> str:
    """Per metric and comparison of the final rounds: the difference of the seed means against twice the
    larger seed spread (std over seeds; the base is one SFT run, spread 0)."""
    final = final_rows(rows)
    lines = ["| metric | comparison | difference | 2 × seed spread | reading |", "|---|---|---|---|---|"]
    for key, header in ((k, h) for k, h in COLUMNS if k in COMPARED):
        for a, b in COMPARISONS:
            if a not in final or b not in final:
                continue
            va, vb = _values(final[a], key), _values(final[b], key)
            if not va or not vb:
                continue
            diff = float(np.mean(va) - np.mean(vb))
            spread = 2 * max(float(np.std(va)), float(np.std(vb)))
            better = (diff < 0) if key in LOWER_IS_BETTER else (diff > 0)
            if len(va) < 2 and len(vb) < 2:
                reading = "one seed: no spread to compare with"
            elif abs(diff) > spread:
                reading = f"{a if better else b} better, beyond 2× the spread"
            else:
                reading = "within 2× the spread"
            lines.append(f"| {header} | {final[a]['name']} − {final[b]['name']} | {diff:+.3f} | {spread:.3f} | {reading} |")
    return "\n".join(lines)


def disagreement(wd: str, seeds: list[int]) -> str:
    """Per seed and round: the share of prompts (with a pair from either miner) where the outcome miner
    and the rubric miner chose different pairs. Round 1 mines the same judged samples for both; later
    rounds mine different policies' samples, so only round 1 compares the miners alone."""
    out = []
    for seed in seeds:
        by = {}
        for arm in ("outcome+sigmoid", "rubric+sigmoid"):
            path = os.path.join(wd, f"seed{seed}", arm, "round_001", "pairs")
            if not os.path.exists(path + ".manifest.json"):
                return ""
            chosen: dict[str, set] = {}
            for p in arrayrecord.read(path):
                meta = p.get("meta", {})
                chosen.setdefault(p["prompt_id"], set()).add((meta.get("chosen_sample"), meta.get("rejected_sample")))
            by[arm] = chosen
        prompts = set(by["outcome+sigmoid"]) | set(by["rubric+sigmoid"])
        differ = [q for q in prompts if by["outcome+sigmoid"].get(q) != by["rubric+sigmoid"].get(q)]
        kinds: dict[str, list[int]] = {}
        for q in prompts:
            kinds.setdefault(q.split("-")[0], []).append(q in differ)
        per_kind = ", ".join(f"{k} {np.mean(v):.2f}" for k, v in sorted(kinds.items()))
        out.append(f"seed {seed}: {len(differ)}/{len(prompts)} = {len(differ) / max(len(prompts), 1):.2f} ({per_kind})")
    return ("Round 1, the same judged samples: prompts where the outcome and rubric miners chose different "
            "pairs — " + "; ".join(out) + ".")


def _round_plots(rows: list[dict]) -> list[tuple[str, str]]:
    """Each metric per round per arm (seed mean, ± std as error bars; round 0 is the SFT base)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = rows[0]
    plots = []
    for key, title in COLUMNS:
        fig, ax = plt.subplots(figsize=(4.2, 3))
        for arm in dict.fromkeys(r["arm"] for r in rows[1:]):
            points = [(0, _values(base, key))]
            points += [(r["round"], _values(r, key)) for r in rows[1:] if r["arm"] == arm]
            points = [(x, v) for x, v in points if v]
            if points:
                ax.errorbar([x for x, _ in points], [np.mean(v) for _, v in points],
                            yerr=[np.std(v) for _, v in points], marker="o", capsize=3, label=arm)
        if ax.lines:
            ax.set_xlabel("round (0: SFT base)")
            ax.set_title(f"{title} per round")
            ax.set_xticks(sorted({r["round"] for r in rows}))
            ax.legend(fontsize=7)
            plots.append((f"{title} per round (mean ± std over seeds)", summary.png(fig)))
        plt.close(fig)
    return plots


def _curves(rows: list[dict]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # a colour per arm and a line style per round; the seeds of a row share both and one legend entry
    colours = {arm: f"C{i}" for i, arm in enumerate(dict.fromkeys(r["arm"] for r in rows))}
    styles = ("-", "--", ":", "-.")
    plots = []
    for key, title, subset in (("loss", "SFT loss (base)", rows[:1]), ("loss", "DPO loss", rows[1:]),
                               ("rewards/accuracies", "DPO reward accuracy", rows[1:]),
                               ("rewards/margins", "DPO reward margin", rows[1:])):
        fig, ax = plt.subplots(figsize=(5, 3))
        for r in subset:
            for seed, run in enumerate(r["runs"]):
                path = os.path.join(run, "metrics.jsonl")
                if not os.path.exists(path):
                    continue
                points = [(m["step"], m[key]) for m in summary.jsonl(path) if key in m]
                if points:
                    ax.plot(*zip(*points), color=colours[r["arm"]], linestyle=styles[max(r["round"] - 1, 0) % 4],
                            linewidth=1, label=None if seed else r["name"])
        ax.set_title(title if len(subset[0]["runs"]) == 1 else f"{title} (every seed)")
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
            plots.append((title, summary.png(fig)))
        plt.close(fig)
    return plots


def _examples(wd: str, rows: list[dict], n: int = 8) -> str:
    pool = {}
    prompts_file = os.path.join(wd, "world", "heldout_prompts.jsonl")
    for p in summary.jsonl(prompts_file):
        pool[p["prompt_id"]] = p
    answers = {}
    for r in rows:  # the first seed's answers of every row
        path = os.path.join(r["evals"][0], "answers.jsonl")
        if os.path.exists(path):
            answers[r["name"]] = {a["prompt_id"]: a for a in summary.jsonl(path)}
    # one example of each question kind first, then more
    ids = list(answers.get(rows[0]["name"], {}))
    by_kind: dict[str, list[str]] = {}
    for i in ids:
        by_kind.setdefault(i.split("-")[0], []).append(i)
    chosen = [v[0] for v in by_kind.values()] + [v[1] for v in by_kind.values() if len(v) > 1]
    parts = []
    for pid in chosen[:n]:
        prompt = pool[pid]
        with open(os.path.join(wd, "world", prompt["image"]), "rb") as f:
            image = base64.b64encode(f.read()).decode()
        cells = []
        for name, table_ in answers.items():
            a = table_.get(pid)
            if a is None:
                continue
            verdicts = "".join(
                f"<li class={'ok' if s >= 0.5 else 'bad'}>{html.escape(c)}: {html.escape(reason)}</li>"
                for c, s, reason in zip(a.get("criteria", []), a.get("scores", []), a.get("reasons", [])))
            cells.append(f"<td><b>{html.escape(name)}</b><p>{html.escape(a['answer'])}</p><ul>{verdicts}</ul></td>")
        parts.append(f"<tr><td><img src='data:image/png;base64,{image}' width=144 style='image-rendering:pixelated'>"
                     f"<p>{html.escape(pid)}: <i>{html.escape(prompt['instruction'])}</i></p>"
                     f"<p>truth: {html.escape(prompt['reference_answer'])}</p></td>{''.join(cells)}</tr>")
    return "<table class=ex>" + "".join(parts) + "</table>"


def write(wd: str, specs: list[dict], *, seeds: list[int], minutes: float, budget: dict) -> str:
    """Writes results.md and report.html for the rows `specs` (see `results`); returns the Markdown table."""
    rows = results(specs)
    md = table(rows)
    world = {**budget, **(summary.load_json(os.path.join(wd, "world", "world.json")) or {})}
    stages = {}
    for name in sorted(os.listdir(os.path.join(wd, "stages"))):
        stage = summary.load_json(os.path.join(wd, "stages", name))
        stages[stage["stage"]] = stage["seconds"]
    note = (f"Held-out prompts: {world['heldout_prompts']}; seeds: {len(seeds)} (mean ± std over seeds); "
            f"SFT: {budget['sft_steps']} steps on {world['sft_examples']} examples "
            f"({world['sft']['imperfect']} imperfect); DPO: {budget['dpo_steps']} steps per arm and round, "
            f"{budget.get('rounds', 1)} on-policy round(s) ({budget['samples']} samples per prompt, "
            f"{world['train_prompts']} prompts; pairs: per seed, of the row's round). "
            f"This run: {minutes:.1f} min (stages finished before are not counted).")
    versus = comparisons(rows)
    differ = disagreement(wd, seeds)
    text = f"{md}\n\n{note}\n\nThe final rounds compared (the paper's ordering):\n\n{versus}\n\n{differ}".rstrip()
    with open(os.path.join(wd, "results.md"), "w") as f:
        f.write(text + "\n")

    def figures(plots):
        return "".join(f"<figure><img src='data:image/png;base64,{png}'><figcaption>{html.escape(t)}</figcaption>"
                       f"</figure>" for t, png in plots)
    per_round, plots = figures(_round_plots(rows)), figures(_curves(rows))
    timing = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.0f} s</td></tr>" for k, v in stages.items())
    md_html = summary.html_table(md)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>rdpo_jax demo</title><style>
body{{font-family:sans-serif;margin:2em;max-width:1400px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top;font-size:13px}} figure{{display:inline-block}}
li.ok{{color:#176117}} li.bad{{color:#a11}} ul{{padding-left:1.2em;margin:0}}</style></head><body>
<h1>rdpo_jax demo: rubric-reward DPO on a world with known truth</h1>
<p>{html.escape(note)}</p>{md_html}
<h2>Per round</h2>{per_round}
<h2>The final rounds compared</h2>{summary.html_table(versus)}<p>{html.escape(differ)}</p>
<h2>Training curves</h2>{plots}
<h2>Held-out examples (seed {seeds[0]})</h2>{_examples(wd, rows)}
<h2>Stage times</h2><table>{timing}</table></body></html>"""
    with open(os.path.join(wd, "report.html"), "w") as f:
        f.write(page)
    return text
