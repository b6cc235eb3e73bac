"""The round's commands in order on a tiny model — build_rubrics → sample → judge → make_pairs →
ref_logps → train — as a user runs them (subprocesses), including resumption."""

import json
import os
import sys

import numpy as np
from PIL import Image

from rdpo_jax.data import arrayrecord
from rdpo_jax.models import hf
from tests import runs

def _run(*args, cache):
    return runs.run([sys.executable, "-m", *args], runs.env(cache)).stdout


def _prompts(folder):
    rng = np.random.default_rng(0)
    colours = ["red", "green", "blue", "yellow"]
    os.makedirs(folder / "images")
    with open(folder / "prompts.jsonl", "w") as f:
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / "images" / f"{i}.png")
            truth = {"mentions": [colours[i % 4]], "details": ["circle"], "absent": [colours[(i + 1) % 4]],
                     "max_words": 8}
            f.write(json.dumps({"prompt_id": f"p{i}", "image": f"images/{i}.png", "instruction": "describe the image",
                                "ground_truth": truth}) + "\n")
    return str(folder / "prompts.jsonl")


def test_round_of_commands_produces_pairs_the_trainer_trains_on(smoke_dir, tmp_path):
    cache, out, model = str(tmp_path / "cache"), str(tmp_path / "round"), f"{smoke_dir}/model"
    _run("data_prep.build_rubrics", f"--input={_prompts(tmp_path)}", f"--out={out}", cache=cache)
    assert len(list(arrayrecord.read(f"{out}/pool"))) == 6

    sample = ("data_prep.sample", f"--pool={out}/pool", f"--model={model}", "--n=8", "--max_new_tokens=10",
              "--batch_size=4", f"--out={out}")
    log = _run(*sample, cache=cache)
    assert "samples: 48" in log
    again = _run(*sample, cache=cache)  # resumed: every prompt is already done, nothing is added
    assert "already_done: 6" in again and "samples: 0" in again
    assert len(list(arrayrecord.read(f"{out}/samples"))) == 48

    log = _run("data_prep.judge", f"--pool={out}/pool", f"--samples={out}/samples", f"--out={out}", cache=cache)
    assert "scored: 48" in log
    judged = list(arrayrecord.read(f"{out}/judged"))
    assert all(len(s["scores"]) == 4 and s["judge"] == "verifier" for s in judged)

    log = _run("data_prep.make_pairs", f"--pool={out}/pool", f"--judged={out}/judged", f"--out={out}",
               "--margin=0.05", cache=cache)
    pairs = list(arrayrecord.read(f"{out}/pairs"))
    assert pairs and f"pairs: {len(pairs)}" in log and "margin histogram" in log
    for p in pairs:
        assert p["chosen_scores"][0] == 1  # the essential criterion: chosen answers pass it
        assert p["chosen"] != p["rejected"] and p["meta"]["miner"] == "rubric"

    _run("data_prep.ref_logps", f"--pairs={out}/pairs", f"--model={model}", "--seq_buckets=48",
         "--max_answer_len=8", "--max_criteria=4", "--batch_size=8", f"--out={out}", cache=cache)
    with_ref = list(arrayrecord.read(f"{out}/pairs_ref"))
    assert len(with_ref) == len(pairs)
    assert {p["ref_fingerprint"] for p in with_ref} == {hf.fingerprint(model)}
    assert all(np.isfinite(p["ref_chosen_logp"]) and p["ref_chosen_logp"] < 0 for p in with_ref)

    workdir = str(tmp_path / "run")
    _run("rdpo_jax.train", f"--config=configs/smoke.py:dir={smoke_dir}", f"--workdir={workdir}",
         f"--config.data.train={out}/pairs_ref", "--config.data.eval=", "--config.dpo.reference=precomputed",
         "--config.total_steps=3", cache=cache)
    metrics = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl")]
    # the precomputed reference is this very model: at step 0 the margin is 0 and the loss log 2
    assert abs(metrics[0]["loss"] - np.log(2)) < 1e-4 and abs(metrics[0]["rewards/margins"]) < 1e-4
    assert metrics[-1]["loss"] < metrics[0]["loss"]
