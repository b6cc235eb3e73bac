"""sample → judge → make_pairs killed (a real SIGKILL, at set records: common.KILL_AT_ENV) and rerun until
done write what uninterrupted runs write, record for record; on the way, token ids travel from the
sampler into the pairs, and text-only prompts sample alongside prompts with an image."""

import io
import os
import signal
import subprocess
import sys

import numpy as np
from PIL import Image

from rdpo_jax.data_prep import common, smoke
from rdpo_jax.data import arrayrecord
from rdpo_jax.data.tokenize import ChatTokenizer
from rdpo_jax.rubrics import generate
from tests import runs

TEXT_ONLY = ("p2", "p5")


def _pool(folder: str) -> None:
    rng = np.random.default_rng(0)
    colours = ["red", "green", "blue", "yellow"]
    pool = []
    for i in range(7):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buf, format="PNG")
        text_only = f"p{i}" in TEXT_ONLY
        # additional criteria only: random answers still differ in reward, so most prompts get pairs
        truth = {"details": [colours[i % 4], "circle"], "absent": [colours[(i + 1) % 4]], "max_words": 6}
        text = "describe the image"
        content = text if text_only else [{"type": "image"}, {"type": "text", "text": text}]
        pool.append(dict(prompt_id=f"p{i}", images=[] if text_only else [buf.getvalue()],
                         messages=[{"role": "user", "content": content}], rubric=generate.rule_rubric(truth)))
    arrayrecord.write(folder, "pool", "rubric_pool", pool)


def _complete(command: list[str], out: str, kills: list[int], cache: str) -> list[dict]:
    """Runs `command` (its dataset: --out/--name), SIGKILLed at the k-th record added of each run in
    `kills`, then to the end; returns the dataset's records in manifest order."""
    name = next(a.split("=")[1] for a in command if a.startswith("--name="))
    command = [sys.executable, "-m", *command, f"--out={out}"]
    for k in kills:
        env = dict(runs.env(cache, devices=1), **{common.KILL_AT_ENV: str(k)})
        proc = subprocess.run(command, cwd=runs.ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
        assert not os.path.exists(arrayrecord.manifest_path(out, name))
    log = runs.run(command, runs.env(cache, devices=1)).stdout
    if kills:
        assert "already_done" in log
    return list(arrayrecord.read(os.path.join(out, name)))


def test_killed_and_rerun_commands_write_what_uninterrupted_ones_write(smoke_dir, compile_cache, tmp_path):
    pool, model = str(tmp_path / "pool"), f"{smoke_dir}/model"
    _pool(str(tmp_path))
    ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")

    # 4 samples a prompt, chunks of ≥ 5 records: a chunk ending at its 5th record would end inside a
    # prompt. Batches of ≤ 3 per image count: [p2, p5], [p0, p1, p3], [p4, p6]. The first kill (record 18:
    # p3's second) leaves [p0, p1, p3] partly done, the second (record 10 of the rerun: p6's second)
    # [p4, p6]; the reruns generate those batches again whole and must write the same samples.
    sample = ["rdpo_jax.data_prep.sample", f"--pool={pool}", f"--model={model}", "--n=4", "--max_new_tokens=8",
              "--batch_size=3", "--chunk_size=5", "--name=samples"]
    samples = _complete(sample, ref, [], compile_cache)
    assert len(samples) == 28 and {s["prompt_id"] for s in samples} >= set(TEXT_ONLY)
    assert _complete(sample, killed, [18, 10], compile_cache) == samples

    tok = ChatTokenizer(model, image_token_id=smoke.IMAGE_TOKEN)
    assert {s["sampler"]["tokenizer"] for s in samples} == {tok.fingerprint}
    for s in samples:  # the text is the ids decoded; a sample that stopped ends with a stop id
        assert s["response"] == tok.tokenizer.decode(s["response_ids"], skip_special_tokens=True).strip()
        assert len(s["response_ids"]) == 8 or s["response_ids"][-1] in tok.stop_ids()
        assert smoke.IMAGE_TOKEN not in s["response_ids"]  # never sampled: training would splice an image in

    judge = ["rdpo_jax.data_prep.judge", f"--pool={pool}", "--judge=verifier", "--chunk_size=5", "--name=judged"]
    judged = _complete(judge + [f"--samples={ref}/samples"], ref, [], compile_cache)
    assert _complete(judge + [f"--samples={killed}/samples"], killed, [13, 7], compile_cache) == judged
    assert [s["response_ids"] for s in judged] == [s["response_ids"] for s in samples]  # the judge keeps them

    # chunks of ≥ 1 pair (ending at the next prompt): a kill before a prompt's second pair is inside its
    # group (the old Output had committed the first); the rerun's kill at record 4 follows commits
    make_pairs = ["rdpo_jax.data_prep.make_pairs", f"--pool={pool}", "--margin=0.05", "--max_pairs=2", "--chunk_size=1",
                  "--name=pairs"]
    pairs = _complete(make_pairs + [f"--judged={ref}/judged"], ref, [], compile_cache)
    second = [i + 1 for i in range(1, len(pairs)) if pairs[i]["prompt_id"] == pairs[i - 1]["prompt_id"]]
    assert second and len(pairs) > 4, "too few pairs: choose pool/sampling settings that give more"
    assert _complete(make_pairs + [f"--judged={killed}/judged"], killed, [second[0], 4], compile_cache) == pairs
    by_id = {s["sample_id"]: s for s in samples}
    for p in pairs:
        assert p["chosen_ids"] == by_id[p["meta"]["chosen_sample"]]["response_ids"]
        assert p["rejected_ids"] == by_id[p["meta"]["rejected_sample"]]["response_ids"]
        assert p["tokenizer"] == tok.fingerprint
