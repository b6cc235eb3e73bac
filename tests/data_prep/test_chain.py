"""The round's commands in order on a tiny model — build_rubrics → sample → judge → make_pairs →
ref_logps → train — with a user's command lines, run in the test process (`runs.call`; each command's
process — restarts, kills, shards — is tested in test_restart.py, test_train.py, test_export.py)."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from configs import smoke
from rdpo_jax import config_checks, train
from rdpo_jax.data import arrayrecord, pipeline, records
from rdpo_jax.models import hf
from tests import runs

BF16 = "--config.model.dtype=bfloat16"

def test_round_of_commands_produces_pairs_the_trainer_trains_on(smoke_dir, tmp_path):
    """…and, with bfloat16 compute, precomputed reference log-likelihoods equal the online reference's to the
    bit; data stamped with other settings is refused, naming the config field. (Restarts of sample, judge
    and make_pairs: test_restart.py.)"""
    out, model = str(tmp_path / "round"), f"{smoke_dir}/model"
    config = f"--config=configs/smoke.py:dir={smoke_dir}"
    runs.call("data_prep.build_rubrics", f"--input={runs.prompts_jsonl(tmp_path)}", f"--out={out}")
    assert len(list(arrayrecord.read(f"{out}/pool"))) == 6

    log = runs.call("data_prep.sample", f"--pool={out}/pool", f"--model={model}", "--n=8", "--max_new_tokens=10",
               "--batch_size=4", f"--out={out}")
    assert "samples: 48" in log
    assert len(list(arrayrecord.read(f"{out}/samples"))) == 48

    log = runs.call("data_prep.judge", f"--pool={out}/pool", f"--samples={out}/samples", f"--out={out}")
    assert "scored: 48" in log
    judged = list(arrayrecord.read(f"{out}/judged"))
    assert all(len(s["scores"]) == 4 and s["judge"] == "verifier" for s in judged)

    log = runs.call("data_prep.make_pairs", f"--pool={out}/pool", f"--judged={out}/judged", f"--out={out}",
               "--margin=0.05")
    pairs = list(arrayrecord.read(f"{out}/pairs"))
    assert pairs and f"pairs: {len(pairs)}" in log and "margin histogram" in log
    for p in pairs:
        assert p["chosen_scores"][0] == 1  # the essential criterion: chosen answers pass it
        assert p["chosen"] != p["rejected"] and p["meta"]["miner"] == "rubric"
        assert p["chosen_ids"] and p["rejected_ids"] and p["tokenizer"]  # the sampled ids travel along

    runs.call("data_prep.ref_logps", config, BF16, f"--pairs={out}/pairs", f"--out={out}")
    with_ref = list(arrayrecord.read(f"{out}/pairs_ref"))
    assert len(with_ref) == len(pairs)
    assert {p["ref_fingerprint"] for p in with_ref} == {hf.fingerprint(model)}
    assert all(np.isfinite(p["ref_chosen_logp"]) and p["ref_chosen_logp"] < 0 for p in with_ref)
    assert {p["ref_settings"]["model.dtype"] for p in with_ref} == {"bfloat16"}
    assert set(with_ref[0]["ref_settings"]) == set(pipeline.REFERENCE_SETTINGS)

    pre, online = str(tmp_path / "precomputed"), str(tmp_path / "online")
    runs.call("rdpo_jax.train", config, f"--workdir={pre}", BF16, f"--config.data.train={out}/pairs_ref",
         "--config.data.eval=", "--config.dpo.reference=precomputed", "--config.total_steps=3")
    runs.call("rdpo_jax.train", config, f"--workdir={online}", BF16, f"--config.data.train={out}/pairs",
         "--config.data.eval=", "--config.total_steps=1")
    a, b = ([json.loads(line) for line in open(f"{w}/metrics.jsonl")] for w in (pre, online))
    # the precomputed reference is this very model: at step 0 the margin is 0 and the loss log 2, in
    # bfloat16 too, and every first-step metric is the online reference's to the bit
    assert a[0]["loss"] == b[0]["loss"] == np.float32(np.log(2)) and a[0]["rewards/margins"] == 0
    for key in ("grad_norm", "logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected"):
        assert a[0][key] == b[0][key], key
    assert a[-1]["loss"] < a[0]["loss"]

    # the same data for a float32 run: refused before anything compiles, naming the field, and per record
    f32 = smoke.get_config(f"dir={smoke_dir}")
    options = pipeline.Options.from_config(f32, reference_fingerprint=hf.fingerprint(model))
    with pytest.raises(config_checks.ConfigError, match="config.model.dtype: the reference log-likelihoods were "
                       "computed with 'bfloat16', this run uses 'float32'"):
        train._check_reference_data(f"{out}/pairs_ref", options)
    with pytest.raises(records.RecordError, match="field 'ref_settings': config.model.dtype"):
        pipeline.Prepare(arrayrecord.Source(f"{out}/pairs_ref"), options, None, None)._rubric(with_ref[0], "rec 0")


def test_qwen_round_of_commands_with_mixed_image_counts(qwen_smoke_dir, tmp_path):
    """Qwen2.5-VL through every command of a round — sample → judge → make_pairs (prompt groups) → ref_logps
    (multi-answer rows) → train (precomputed reference, two groups per row) → evaluate → export — on prompts
    with 0, 1 and 2 images of different sizes in one pool."""
    out, model = str(tmp_path / "round"), f"{qwen_smoke_dir}/model"
    config = f"--config=configs/smoke.py:dir={qwen_smoke_dir},family=qwen2_5_vl"
    rng = np.random.default_rng(1)
    os.makedirs(tmp_path / "images")
    with open(tmp_path / "prompts.jsonl", "w") as f:
        for i in range(6):
            paths = []
            for j in range(i % 3):  # 0, 1, 2 images
                h, w = rng.integers(8, 49, 2)
                Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i}{j}.png")
                paths.append(f"images/{i}{j}.png")
            truth = {"mentions": ["red"], "details": ["circle"], "absent": ["blue"], "max_words": 8}
            f.write(json.dumps({"prompt_id": f"p{i}", "images": paths, "instruction": "describe the image",
                                "ground_truth": truth}) + "\n")
    runs.call("data_prep.build_rubrics", f"--input={tmp_path / 'prompts.jsonl'}", f"--out={out}")
    assert sorted(len(r["images"]) for r in arrayrecord.read(f"{out}/pool")) == [0, 0, 1, 1, 2, 2]
    log = runs.call("data_prep.sample", f"--pool={out}/pool", f"--model={model}", "--n=8", "--max_new_tokens=10",
               "--batch_size=6", f"--out={out}")
    assert "samples: 48" in log
    runs.call("data_prep.judge", f"--pool={out}/pool", f"--samples={out}/samples", f"--out={out}")
    log = runs.call("data_prep.make_pairs", f"--pool={out}/pool", f"--judged={out}/judged", f"--out={out}",
               "--margin=0.05", "--max_pairs=3", "--format=groups")
    groups = list(arrayrecord.read(f"{out}/pairs"))
    n = sum(len(g["pairs"]) for g in groups)
    assert f"groups: {len(groups)}" in log and f"pairs: {n}" in log and n > len(groups)  # some prompts share
    multi = ("--config.dpo.pair_layout=multi_answer", "--config.data.seq_buckets=(128,)")
    runs.call("data_prep.ref_logps", config, *multi, f"--pairs={out}/pairs", f"--out={out}")
    with_ref = {g["group_id"]: g for g in arrayrecord.read(f"{out}/pairs_ref")}
    assert len(with_ref) == len(groups)
    assert all(p["ref_chosen_logp"] < 0 and p["ref_rejected_logp"] < 0 for g in with_ref.values() for p in g["pairs"])
    # scored two groups per row, every pair's reference log-likelihoods are the same
    runs.call("data_prep.ref_logps", config, *multi, "--config.data.groups_per_row=2", f"--pairs={out}/pairs",
         f"--out={out}", "--name=pairs_ref_packed")
    packed = {g["group_id"]: g for g in arrayrecord.read(f"{out}/pairs_ref_packed")}
    assert packed.keys() == with_ref.keys()
    for key, g in packed.items():
        for p, q in zip(g["pairs"], with_ref[key]["pairs"]):
            assert p["ref_chosen_logp"] == pytest.approx(q["ref_chosen_logp"], abs=1e-4)
            assert p["ref_rejected_logp"] == pytest.approx(q["ref_rejected_logp"], abs=1e-4)
    run = str(tmp_path / "run")
    log = runs.call("rdpo_jax.train", config, *multi, f"--workdir={run}", f"--config.data.train={out}/pairs_ref_packed",
               "--config.data.eval=", "--config.dpo.reference=precomputed", "--config.total_steps=2",
               "--config.data.groups_per_row=2")
    assert "compiled the dpo step for 4 rows of 128 tokens" in log  # 8 groups in 4 rows
    metrics = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
    # the reference is the initial policy, scored as training packs (two groups per row: patch buffers, 3D
    # positions and segments per group; the stamp refuses data scored one group per row): step 1's margin is 0
    # and its loss log 2
    assert metrics[0]["rewards/margins"] == pytest.approx(0, abs=1e-5) and 0 < metrics[0]["token_padding"] < 1
    assert metrics[0]["loss"] == pytest.approx(np.log(2), abs=1e-5) and 0 < metrics[0]["patch_padding"] < 1
    log = runs.call("rdpo_jax.evaluate", f"--model={run}", f"--pool={out}/pool", f"--out={tmp_path / 'eval'}",
               "--max_new_tokens=6")
    assert len(open(tmp_path / "eval" / "answers.jsonl").readlines()) == 6
    runs.call("rdpo_jax.export", f"--workdir={run}", f"--out={tmp_path / 'hf'}")
    import transformers

    loaded, info = transformers.AutoModelForImageTextToText.from_pretrained(str(tmp_path / "hf"),
                                                                          output_loading_info=True)
    assert type(loaded).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert json.load(open(tmp_path / "hf" / "config.json"))["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert os.path.exists(tmp_path / "hf" / "preprocessor_config.json")
