"""The loop's pieces without a model: stages recorded in the manifest, never redone, their inputs
fingerprinted and a changed input refused; no stage starts after SIGTERM; the recorded config, its paths
and its refusal; the config file's options are the commands' flags."""

import json
import os
import re
import sys

import pytest

from configs import loop_demo, loop_smoke
from rdpo_jax import defaults
from rdpo_jax.data import arrayrecord
from rdpo_jax.loop import rounds
from rdpo_jax.loop.__main__ import Loop, check_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _json_tool(src, dst):
    """A stage: `python -m json.tool SRC DST` (a real command that fails on bad input)."""
    return lambda: ("json.tool", [src, dst], {"src": src}, {"dst": dst})


def test_a_stage_runs_once_and_its_changed_input_is_refused(tmp_path):
    src, dst = str(tmp_path / "in.json"), str(tmp_path / "out.json")
    with open(src, "w") as f:
        f.write("{not json")
    R = rounds.Round(str(tmp_path / "runs"), 1, dict(os.environ), ROOT)
    with pytest.raises(rounds.StageFailed, match=r"round 1 copy: exit 1 \(log .*copy\.log\)"):
        R.run("copy", _json_tool(src, dst))
    st = json.load(open(R.path))["stages"]["copy"]
    assert st["status"] == "failed" and st["attempts"] == 1 and st["module"] == "json.tool"
    assert st["input_fingerprints"]["src"].startswith("file:") and "Expecting property name" in open(st["log"]).read()

    # the input changed since the first attempt: resuming would mix two inputs' outputs
    with open(src, "w") as f:
        json.dump({"a": 1}, f)
    R = rounds.Round(str(tmp_path / "runs"), 1, dict(os.environ), ROOT)
    with pytest.raises(rounds.StageFailed, match=r"its inputs changed since its first attempt: src \(.*in\.json: file:"):
        R.run("copy", _json_tool(src, dst))

    # started over (its entry deleted), it runs with the recorded command; a finished stage is not run again
    R.m["stages"].clear()
    st = R.run("copy", _json_tool(src, dst))
    assert st["status"] == "done" and json.load(open(dst)) == {"a": 1}
    assert st["output_fingerprints"] == {"dst": rounds.fingerprint(dst)}
    os.remove(dst)
    again = rounds.Round(str(tmp_path / "runs"), 1, dict(os.environ), ROOT).run("copy", _json_tool("x", "y"))
    assert again["attempts"] == 1 and not os.path.exists(dst)
    # a skipped stage is recorded once, with its reason
    R.skip("train", "the miner found no pairs")
    R.skip("train", "another reason")
    assert json.load(open(R.path))["stages"]["train"] == {"status": "skipped", "note": "the miner found no pairs"}


def test_no_stage_starts_after_sigterm(tmp_path):
    """SIGTERM between two stages (the handler calls `terminate` on the current round, whose stage has
    just finished): the next stage does not start, nor the next round's; the round is recorded as
    interrupted, and a rerun runs what did not start."""
    wd, src = str(tmp_path / "runs"), str(tmp_path / "in.json")
    with open(src, "w") as f:
        json.dump({"a": 1}, f)
    config = loop_smoke.get_config(f"dir={tmp_path}")
    loop = Loop(config, wd)
    R = loop.open(1)
    R.run("first", _json_tool(src, str(tmp_path / "first.json")))
    loop.current.terminate()  # what the loop's SIGTERM handler does
    with pytest.raises(rounds.StageFailed, match=r"round 1 second: not started \(SIGTERM\)"):
        R.run("second", _json_tool(src, str(tmp_path / "second.json")))
    with pytest.raises(rounds.StageFailed, match=r"round 2 first: not started \(SIGTERM\)"):
        loop.open(2).run("first", _json_tool(src, str(tmp_path / "first2.json")))
    assert not os.path.exists(tmp_path / "second.json") and not os.path.exists(tmp_path / "first2.json")
    m = json.load(open(R.path))
    assert m["status"] == "interrupted" and list(m["stages"]) == ["first"]
    again = Loop(config, wd).open(1)  # the rerun
    assert again.run("second", _json_tool(src, str(tmp_path / "second.json")))["status"] == "done"
    assert json.load(open(again.path))["status"] == "running"


def test_config_paths_resolve_against_the_first_calls_directory(tmp_path, monkeypatch):
    """Paths typed relative are stored absolute against the directory of the loop's first call, where
    its stages run; a rerun from elsewhere, typing the same, resolves them there too: nothing changed."""
    wd, first, other = str(tmp_path / "runs"), tmp_path / "first", tmp_path / "other"
    first.mkdir()
    other.mkdir()
    monkeypatch.chdir(first)
    c = loop_smoke.get_config("dir=smoke")
    assert c.train.config == f"{os.path.dirname(loop_smoke.__file__)}/smoke.py:dir=smoke"  # beside it, from anywhere
    c.first_judged, c.train.config = "judged", "configs/smoke.py:dir=smoke"  # typed relative
    base = check_config(wd, c, allow_change=False)
    assert (c.policy, c.first_judged, c.pool.train) == (f"{first}/smoke/model", f"{first}/judged",
                                                        f"{first}/smoke/prompts.jsonl")
    assert c.train.config == f"{first}/configs/smoke.py:dir=smoke"  # the file; its argument is the config's
    assert base == str(first)  # the stages run there
    monkeypatch.chdir(other)
    again = loop_smoke.get_config("dir=smoke")
    again.first_judged, again.train.config = "judged", "configs/smoke.py:dir=smoke"
    base = check_config(wd, again, allow_change=False)
    assert again.policy == c.policy and again.train.config == c.train.config and base == str(first)
    record = json.load(open(os.path.join(wd, "loop_config.json")))
    assert record["cwd"] == str(first) and record["config"]["policy"] == f"{first}/smoke/model"
    assert record["changes"] == []


def test_fingerprints_tell_inputs_apart(tmp_path):
    # a dataset by its manifest's kind and shards (not its creation time)
    ds = str(tmp_path / "pool")
    arrayrecord.write_manifest(str(tmp_path), "pool", "samples", [("pool-00000-of-00001.array_record", 3)], "test")
    before = rounds.fingerprint(ds)
    assert before.startswith("dataset:3:")
    arrayrecord.write_manifest(str(tmp_path), "pool", "samples", [("pool-00000-of-00001.array_record", 3)], "again")
    assert rounds.fingerprint(ds) == before
    arrayrecord.write_manifest(str(tmp_path), "pool", "samples", [("pool-00000-of-00001.array_record", 4)], "test")
    assert rounds.fingerprint(ds).startswith("dataset:4:")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    first = rounds.fingerprint(str(folder))
    (folder / "model.safetensors").write_bytes(b"0" * 8)
    assert first.startswith("folder:") and rounds.fingerprint(str(folder)) != first
    assert rounds.fingerprint(str(tmp_path / "nothing")) == "missing"


def test_a_changed_config_is_refused_naming_the_fields(tmp_path, capsys):
    wd = str(tmp_path)
    c = loop_smoke.get_config(f"dir={wd}")
    check_config(wd, c, allow_change=False)
    check_config(wd, c, allow_change=False)  # the same config: accepted
    c2 = loop_smoke.get_config(f"dir={wd}")
    c2.sample.n, c2.pairs.miner, c2.rounds = 2, "outcome", 5  # `rounds` may change freely
    with pytest.raises(SystemExit, match=r"pairs\.miner: 'rubric' → 'outcome'\n  sample\.n: 4 → 2\n") as e:
        check_config(wd, c2, allow_change=False)
    assert "rounds" not in str(e.value)
    check_config(wd, c2, allow_change=True)
    record = json.load(open(os.path.join(wd, "loop_config.json")))
    assert record["config"]["sample.n"] == 2 and record["changes"][0]["fields"] == {
        "pairs.miner": ["rubric", "outcome"], "sample.n": [4, 2]}
    assert "config changed (pairs.miner, sample.n)" in capsys.readouterr().out


# loop config group → the command whose flags it holds (evaluate's `initial` is the loop's own)
COMMANDS = {"sample": "data_prep/sample.py", "judge": "data_prep/judge.py",
            "pairs": "data_prep/make_pairs.py", "evaluate": "rdpo_jax/evaluate.py"}


def test_loop_options_are_the_commands_flags_and_each_has_a_comment():
    c = defaults.loop()
    for group, module in COMMANDS.items():
        source = open(os.path.join(ROOT, module)).read()
        for key in c[group]:
            if (group, key) != ("evaluate", "initial"):
                assert re.search(rf'DEFINE_\w+\(\s*"{key}"', source), f"{group}.{key} is not a flag of {module}"
    text = open(defaults.__file__).read().split("\ndef loop()", 1)[1]
    for line in text.splitlines():
        if line.strip().startswith("c.") and " = " in line and "ConfigDict()" not in line:
            assert "#" in line, line


def test_demo_and_smoke_loop_configs():
    for arm, (miner, loss) in loop_demo.ARMS.items():
        c = loop_demo.get_config(f"dir=/wd,arm={arm},seed=2,steps=5")
        assert c.pairs.miner == miner and f"loss={loss},steps=5,seed=2" in c.train.config
        assert c.first_judged == "/wd/seed2/round1/judged" and c.policy == "/wd/sft"
        assert (c.evaluate.samples, c.evaluate.temperature, c.evaluate.seed) == (4, 1.0, 2)  # sampled answers too
    assert loop_demo.get_config("dir=/wd,arm=rubric+rubric,eval_samples=0").evaluate.samples == 0
    with pytest.raises(ValueError, match="arm='dpo' is not one of"):
        loop_demo.get_config("dir=/wd,arm=dpo")
    c = loop_smoke.get_config("dir=/s,reference=initial,ref_logps=1")
    assert c.reference == "initial" and c.ref_logps is True and c.pool.train == "/s/prompts.jsonl"
    assert sys.modules["configs.loop_smoke"].__doc__.count("python -m rdpo_jax.loop") == 1


def test_lora_rounds_against_the_initial_policy_need_precomputed_references(tmp_path):
    """A LoRA run's online reference is its base (the round's starting policy): the initial policy as the
    reference of later rounds has to be precomputed, and the loop says so before round 1."""
    config = loop_smoke.get_config(f"dir={tmp_path}")
    with config.unlocked():
        config.train.overrides = ("lora.rank=8",)
        config.reference = "initial"
    with pytest.raises(SystemExit, match="needs config.ref_logps=True"):
        Loop(config, str(tmp_path / "runs"))
    config.ref_logps = True
    Loop(config, str(tmp_path / "runs"))
