"""Qwen3-VL through the commands, in the test process: a round (sample → judge → make_pairs → ref_logps →
train → export; `evaluate` samples as `sample` does), the local Flax judge with a Qwen3-VL judge model, and the server's engine
against transformers' `generate` on prompts built from records (the chat template, preprocessing with the
folder's patch size, 3D positions and DeepStack all on the serving path)."""

import json
import queue

import numpy as np
import pytest
import torch
import transformers

from rdpo_jax import inference, testing
from rdpo_jax.data import arrayrecord
from rdpo_jax.rubrics.judge import Item
from rdpo_jax.rubrics.local import FlaxJudge
from rdpo_jax.serve import engine as engine_lib
from tests import runs

RUBRIC = {"criteria": [{"id": "colour", "text": "names the red circle", "kind": "essential", "weight": 1.0,
                        "scale": "binary"}]}


def test_round_of_commands(qwen3_smoke_dir, tmp_path):
    """Pairs from a sampled, judged pool train with their precomputed reference (the initial policy: step 1's
    margin 0, loss log 2); the trained run exports a folder transformers loads whole."""
    round_of_commands(qwen3_smoke_dir, tmp_path, "qwen3_vl", "Qwen3VLForConditionalGeneration")


def round_of_commands(smoke_dir: str, tmp_path, family: str, architecture: str) -> str:
    """The test above for the smoke setup of `family` in `smoke_dir` (a MoE's first loss: log 2 + its
    load-balancing term); returns the trained run's folder."""
    out, model = str(tmp_path / "round"), f"{smoke_dir}/model"
    config = f"--config=configs/smoke.py:dir={smoke_dir},family={family}"
    runs.call("data_prep.build_rubrics", f"--input={runs.prompts_jsonl(tmp_path)}", f"--out={out}")
    log = runs.call("data_prep.sample", f"--pool={out}/pool", f"--model={model}", "--n=6", "--max_new_tokens=8",
                    "--batch_size=6", f"--out={out}")
    assert "samples: 36" in log
    runs.call("data_prep.judge", f"--pool={out}/pool", f"--samples={out}/samples", f"--out={out}")
    runs.call("data_prep.make_pairs", f"--pool={out}/pool", f"--judged={out}/judged", f"--out={out}", "--margin=0.05")
    pairs = list(arrayrecord.read(f"{out}/pairs"))
    assert pairs and all(p["chosen_ids"] and p["rejected_ids"] for p in pairs)
    runs.call("data_prep.ref_logps", config, f"--pairs={out}/pairs", f"--out={out}")
    run = str(tmp_path / "run")
    runs.call("rdpo_jax.train", config, f"--workdir={run}", f"--config.data.train={out}/pairs_ref",
              "--config.data.eval=", "--config.dpo.reference=precomputed", "--config.total_steps=2")
    metrics = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
    assert metrics[0]["rewards/margins"] == pytest.approx(0, abs=1e-5)
    text = json.load(open(f"{model}/config.json"))["text_config"]
    balance = text.get("router_aux_loss_coef", 0.0) * metrics[0].get("moe/aux_loss", 0.0)
    assert metrics[0]["loss"] == pytest.approx(np.log(2) + balance, abs=1e-5)
    runs.call("rdpo_jax.export", f"--workdir={run}", f"--out={tmp_path / 'hf'}")
    loaded, info = transformers.AutoModelForImageTextToText.from_pretrained(str(tmp_path / "hf"),
                                                                          output_loading_info=True)
    assert type(loaded).__name__ == architecture
    assert not info["missing_keys"] and not info["unexpected_keys"]
    processor = json.load(open(tmp_path / "hf" / "preprocessor_config.json"))
    assert processor["processor_class"] == "Qwen3VLProcessor"
    return run


def test_flax_judge_with_a_qwen3_model(qwen3_smoke_dir):
    """A Qwen3-VL judge: items with and without images reply in one batch as they do alone."""
    judge = FlaxJudge(inference.load(f"{qwen3_smoke_dir}/model"), name="qwen3", max_new_tokens=6, batch_size=2)
    png = testing.png(np.random.default_rng(0), (20, 20))
    image = Item("i", [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe"}]}],
                 [png], RUBRIC, "a red circle")
    text = Item("t", [{"role": "user", "content": "name a red shape"}], [], RUBRIC, "a red circle")
    alone = {item.key: judge.replies([item])[0] for item in (text, image)}
    assert judge.replies([text, image]) == [alone["t"], alone["i"]]


def test_engine_decodes_as_transformers_generate(qwen3_smoke_dir):
    """The server's engine on prompts with 0, 1 and 2 images of different sizes in one batch: each greedy
    answer is transformers' greedy `generate` of its prompt alone (stopping at the stop ids)."""
    engine_equals_generate(qwen3_smoke_dir)


def engine_equals_generate(smoke_dir: str):
    """The test above for the smoke setup in `smoke_dir` (its model's transformers class from config.json)."""
    policy = inference.load(f"{smoke_dir}/model")
    records = list(arrayrecord.read(f"{smoke_dir}/pairs"))[:6]
    assert {len(r["images"]) for r in records} == {0, 1, 2}
    settings = policy.sampling_config(max_new_tokens=8, temperature=0.0)
    prompts = [policy.tokenizer.encode(r["messages"], r["images"], policy.image_input) for r in records]
    theirs = transformers.AutoModelForImageTextToText.from_pretrained(f"{smoke_dir}/model",
                                                                      attn_implementation="eager")
    want = []
    for prompt in prompts:
        ids = torch.tensor(prompt.ids[None], dtype=torch.long)
        kw = {}
        if prompt.images:
            kw = dict(pixel_values=torch.tensor(prompt.images["patches"]),
                      image_grid_thw=torch.tensor(prompt.images["grids"]))
        with torch.no_grad():
            out = theirs.generate(input_ids=ids, mm_token_type_ids=(ids == policy.config.image_token_id).long(),
                                  max_new_tokens=8, do_sample=False, eos_token_id=list(settings.stop_ids),
                                  pad_token_id=settings.pad_id, bad_words_ids=[[policy.config.image_token_id]], **kw)
        generated = out[0, ids.shape[1]:].tolist()
        ends = [k for k, t in enumerate(generated) if t in settings.stop_ids]
        want.append(generated[:ends[0] + 1] if ends else generated)
    served = engine_lib.Engine(policy, max_batch=8)
    served.start()
    events = [queue.Queue() for _ in prompts]
    try:
        for p, q in zip(prompts, events):
            served.submit(engine_lib.Request(prompt=p, sampling=settings, emit=q.put))
        for q, ids in zip(events, want):
            got, event = "", q.get(timeout=120)
            while event[0] == "delta":
                got, event = got + event[2], q.get(timeout=120)
            body = ids[:-1] if ids and ids[-1] in settings.stop_ids else ids
            assert event[0] == "done" and got == policy.tokenizer.decode(body) and event[3] == len(ids)
    finally:
        served.close()
