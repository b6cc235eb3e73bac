"""The loop's summary across rounds: a Markdown table (printed, RUNS/summary.md), RUNS/report.html with
the table, each metric per round and the DPO curves, and round-level TensorBoard scalars
(RUNS/tensorboard: `eval/METRIC`, `pairs`, `train/loss`, `seconds/STAGE` at step = round)."""

from __future__ import annotations

import base64
import html
import io
import json
import os

from rdpo_jax.loop import rounds as rounds_lib

METRICS = [("essential_pass", "essential pass"), ("rubric_score", "rubric score"),
           ("hallucination", "hallucination"), ("accuracy", "accuracy"), ("words", "words")]
# evaluate --samples=N: the same numbers over N sampled answers per prompt (shown when evaluated)
SAMPLED = [("sampled/essential_pass", "sampled: essential pass"), ("sampled/hallucination", "sampled: hallucination")]


def metric(metrics: dict | None, key: str) -> float | None:
    """A number of evaluate's metrics.json ("sampled/KEY": of the sampled answers), None where absent."""
    for part in key.split("/"):
        if not isinstance(metrics, dict) or part not in metrics:
            return None
        metrics = metrics[part]
    return metrics


def columns(all_metrics: list[dict | None]) -> list[tuple[str, str]]:
    """The metrics to show: METRICS, and SAMPLED when some evaluation sampled answers."""
    return METRICS + (SAMPLED if any(m and "sampled" in m for m in all_metrics) else [])


def load_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def round_row(workdir: str, r: int) -> dict | None:
    """Round r's numbers from its manifest and outputs (None if the round has not started)."""
    manifest = load_json(os.path.join(rounds_lib.round_dir(workdir, r), rounds_lib.MANIFEST))
    if manifest is None:
        return None
    stages = manifest["stages"]
    row = {"round": r, "status": manifest["status"], "note": manifest.get("note", ""),
           "seconds": {name: st["seconds"] for name, st in stages.items() if "seconds" in st}}
    ev = stages.get("evaluate")
    row["metrics"] = load_json(os.path.join(ev["outputs"]["eval"], "metrics.json")) if ev and ev["status"] == "done" else None
    pairs = stages.get("pairs")
    if pairs and pairs["status"] == "done":
        row["pairs"] = load_json(pairs["outputs"]["pairs"] + ".manifest.json")["count"]
    train = stages.get("train")
    if train and train["status"] == "done":
        losses = [m for m in jsonl(os.path.join(train["outputs"]["run"], "metrics.jsonl")) if "loss" in m]
        if losses:
            row["loss"], row["steps"] = losses[-1]["loss"], losses[-1]["step"]
    return row


def table(rows: list[dict]) -> str:
    """Round | pairs | final DPO loss | the evaluate metrics (deterministic: no times)."""
    shown = columns([row["metrics"] for row in rows])
    head = ["round", "policy", "pairs", "DPO loss"] + [h for _, h in shown]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        if row["round"] == 0:
            policy = "initial"
        elif "loss" in row:
            policy = f"trained {row['steps']} steps"
        else:
            policy = row["note"] or row["status"]
        cells = [str(row["round"]), policy, str(row.get("pairs", "–")),
                 f"{row['loss']:.4f}" if "loss" in row else "–"]
        cells += ["–" if (v := metric(row["metrics"], k)) is None else f"{v:.3f}" for k, _ in shown]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def times(rows: list[dict]) -> str:
    stages = list(dict.fromkeys(s for row in rows for s in row["seconds"]))
    lines = ["| round | " + " | ".join(stages) + " |", "|" + "---|" * (len(stages) + 1)]
    for row in rows:
        cells = [f"{row['seconds'][s]:.0f} s" if s in row["seconds"] else "–" for s in stages]  # – : skipped
        lines.append(f"| {row['round']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(workdir: str, last_round: int) -> str:
    """Writes summary.md and report.html for rounds 0 … last_round; returns the table."""
    rows = [row for row in (round_row(workdir, r) for r in range(last_round + 1)) if row is not None]
    text = table(rows)
    with open(os.path.join(workdir, "summary.md"), "w") as f:
        f.write(f"# rDPO loop: {workdir}\n\nHeld-out evaluation after each round (round 0: the initial policy).\n\n"
                f"{text}\n\n## Stage times\n\n{times(rows)}\n")
    with open(os.path.join(workdir, "report.html"), "w") as f:
        f.write(_html(workdir, rows))
    return text


def tensorboard(workdir: str, row: dict) -> None:
    """Round-level scalars of a finished round (written once, when the round finishes)."""
    import tensorboardX

    with tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard")) as tb:
        r = row["round"]
        for k, _ in METRICS + SAMPLED:
            if (v := metric(row["metrics"], k)) is not None:
                tb.add_scalar(f"eval/{k}", v, r)
        if "pairs" in row:
            tb.add_scalar("pairs", row["pairs"], r)
        if "loss" in row:
            tb.add_scalar("train/loss", row["loss"], r)
        for stage, seconds in row["seconds"].items():
            tb.add_scalar(f"seconds/{stage}", seconds, r)


def png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _plots(workdir: str, rows: list[dict]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = []

    def keep(fig, ax, xlabel: str, title: str) -> None:
        if ax.lines:
            ax.set_xlabel(xlabel)
            ax.set_title(title)
            ax.legend(fontsize=7)
            plots.append((title, png(fig)))
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3))
    for k, title in METRICS[:4] + SAMPLED:
        points = [(row["round"], v) for row in rows if (v := metric(row["metrics"], k)) is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=title)
    keep(fig, ax, "round", "held-out evaluation per round")
    fig, ax = plt.subplots(figsize=(5, 3))
    for row in rows:
        run = os.path.join(rounds_lib.round_dir(workdir, row["round"]), "run", "metrics.jsonl")
        points = [(m["step"], m["loss"]) for m in jsonl(run) if "loss" in m]
        if points:
            ax.plot(*zip(*points), label=f"round {row['round']}")
    keep(fig, ax, "step", "DPO loss per round")
    return plots


def html_table(text: str) -> str:
    """A Markdown table as an HTML table."""
    lines = [line.strip("|").split("|") for line in text.splitlines() if not line.startswith("|---")]
    out = ["<table>"]
    for i, cells in enumerate(lines):
        tag = "th" if i == 0 else "td"
        out.append("<tr>" + "".join(f"<{tag}>{html.escape(c.strip())}</{tag}>" for c in cells) + "</tr>")
    return "\n".join(out + ["</table>"])


def _html(workdir: str, rows: list[dict]) -> str:
    images = "".join(f'<figure><img src="data:image/png;base64,{png}"><figcaption>{html.escape(t)}</figcaption>'
                     f"</figure>" for t, png in _plots(workdir, rows))
    logs = []
    for row in rows:
        folder = os.path.join(rounds_lib.round_dir(workdir, row["round"]), "logs")
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            logs.append(f'<li><a href="{html.escape(os.path.relpath(os.path.join(folder, name), workdir))}">'
                        f"round {row['round']}: {html.escape(name)}</a></li>")
    return (f"<!doctype html><meta charset='utf-8'><title>rDPO loop: {html.escape(workdir)}</title>"
            "<style>body{font-family:sans-serif;margin:2em} table{border-collapse:collapse} "
            "td,th{border:1px solid #ccc;padding:4px 8px} figure{display:inline-block}</style>"
            f"<h1>rDPO loop</h1><p>{html.escape(workdir)}</p><h2>Held-out evaluation per round</h2>"
            f"{html_table(table(rows))}{images}<h2>Stage times</h2>{html_table(times(rows))}"
            f"<h2>Stage logs</h2><ul>{''.join(logs)}</ul>")
