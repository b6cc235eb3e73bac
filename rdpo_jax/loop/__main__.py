"""Rounds of on-policy rDPO with one resumable command.

    python -m rdpo_jax.loop --config=configs/NAME.py[:ARG] --workdir=RUNS [--rounds=N]
        [--allow_config_change] [--config.FIELD=VALUE …]

Round 0 builds the rubric pools from prompt files (`data_prep.build_rubrics`; or takes the datasets the
config names) and evaluates the initial policy. Round r = 1, 2, … then runs, each stage the command a
user would type, in a subprocess, with its log in RUNS/round_NNN/logs/STAGE.log:

  sample     data_prep.sample      the current policy (round r-1's) answers the train pool
  judge      data_prep.judge       criterion-by-criterion verdicts
  pairs      data_prep.make_pairs  the miner's preference pairs (none: the policy stays as it was)
  ref_logps  data_prep.ref_logps   with `ref_logps=True`: the reference's log-likelihoods
  train      rdpo_jax.train                 DPO from the current policy; reference: that policy
                                            (`reference="previous"`) or the initial one ("initial")
  evaluate   rdpo_jax.evaluate              the new policy on the held-out pool

Each round's manifest (RUNS/round_NNN/manifest.json, see rounds.py) records every stage's command, its
inputs' fingerprints, outputs and status. Rerunning the command after a kill at any point resumes at the
interrupted stage (each command resumes its own partial output) and never redoes a finished one;
`--rounds` can be raised to continue a finished loop. The config is recorded in RUNS/loop_config.json:
a rerun with other values is refused, naming the fields, unless --allow_config_change (then the new
values apply to the stages not started yet). Relative paths in the config (`policy`, `first_judged`,
`pool.*`, `train.config`'s file) are made absolute against the directory the loop was first run from,
recorded there too: every stage runs in that directory, so a rerun from anywhere else resolves
everything as the first call did. SIGTERM is passed on to the running stage (a training run saves its
step), no further stage starts, and the loop exits; rerun to resume.

After each round: the table of every round's held-out metrics (printed at the end, RUNS/summary.md),
RUNS/report.html, and round-level TensorBoard scalars in RUNS/tensorboard.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

from absl import app, flags, logging
from ml_collections import config_flags

from rdpo_jax.loop import rounds as rounds_lib
from rdpo_jax.loop import summary
from rdpo_jax.loop.rounds import Round, StageFailed, is_dataset

# training config fields the loop sets every round (an override of them in train.overrides is refused)
LOOP_OWNED = ("data.train", "init_from", "dpo.reference_from", "dpo.reference")
# evaluate's judge flags, from the loop's judge group
EVALUATE_JUDGE = ("judge", "judge_model", "endpoint", "api_key_env")
# config fields holding a path (train.config: before its ":ARG"), made absolute against the loop's directory
PATHS = ("policy", "first_judged", "pool.train", "pool.heldout", "train.config")


def _flags(group, skip=()) -> list[str]:
    """A config group as a command's flags (empty strings left out: the command's default applies)."""
    return [f"--{k}={v}" for k, v in group.items() if k not in skip and v != ""]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _absolute(values: dict, base: str) -> dict:
    """`values` (flattened config) with the `PATHS` fields made absolute against `base`."""
    out = dict(values)
    for key in PATHS:
        value = out.get(key)
        if value:
            file, sep, arg = value.partition(":") if key == "train.config" else (value, "", "")
            out[key] = os.path.normpath(os.path.join(base, file)) + sep + arg
    return out


def check_config(workdir: str, config, allow_change: bool) -> str:
    """Records the config in WORKDIR/loop_config.json, its paths absolute against the directory of the
    first call (recorded as `cwd`); a rerun with other values (`rounds` aside) is refused, naming each
    changed field, unless `allow_change`. Sets the config's paths to those absolute ones and returns the
    loop's directory (where its stages run)."""
    path = os.path.join(workdir, "loop_config.json")
    record = {"cwd": os.getcwd(), "changes": []}
    if os.path.exists(path):
        with open(path) as f:
            record = {"cwd": os.getcwd(), **json.load(f)}  # a record of an older loop has no cwd: this one
        if not os.path.isdir(record["cwd"]):
            raise SystemExit(f"[loop] {workdir} was first run from {record['cwd']}, which is gone: its stages' "
                             "recorded commands run there")
    base = record["cwd"]
    now = json.loads(json.dumps({k: v for k, v in _flatten(config.to_dict()).items() if k != "rounds"}))
    now = _absolute(now, base)
    for key in PATHS:
        group, _, name = key.rpartition(".")
        (config[group] if group else config)[name] = now[key]
    if "config" not in record:
        record["config"] = now
    else:
        before = _absolute(record["config"], base)
        changed = {k: (before.get(k), now.get(k)) for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)}
        if changed and not allow_change:
            lines = "\n".join(f"  {k}: {a!r} → {b!r}" for k, (a, b) in changed.items())
            raise SystemExit(f"[loop] the config differs from the one {workdir} was run with:\n{lines}\n"
                             "Rerun with the recorded config, or pass --allow_config_change to apply the new values "
                             "to the stages not started yet (finished and started stages keep their commands)")
        if changed:
            record["changes"].append({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                      "fields": {k: list(v) for k, v in changed.items()}})
            record["config"] = now
            print(f"[loop] config changed ({', '.join(changed)}): applies to the stages not started yet")
    os.makedirs(workdir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=2)
    os.replace(path + ".tmp", path)
    return base


def _dataset_written(key: str):
    def finished(st: dict) -> str | None:
        path = st["outputs"][key]
        return None if is_dataset(path) else f"exit 0 but {path} has no manifest (not every shard finished)"
    return finished


def _train_finished(st: dict) -> str | None:
    """A training run is finished when its latest checkpoint is its last step (SIGTERM saves and exits 0)."""
    from rdpo_jax import checkpoint

    run = checkpoint.RunDir.open(st["outputs"]["run"])
    total = run.config["total_steps"]
    steps = run.steps()
    last = steps[-1] if steps else 0
    return None if last == total else f"stopped at step {last} of {total} (preempted?)"


def _evaluated(st: dict) -> str | None:
    path = os.path.join(st["outputs"]["eval"], "metrics.json")
    return None if os.path.exists(path) else f"exit 0 but no {path}"


class Loop:
    def __init__(self, config, workdir: str, cwd: str | None = None):
        """`cwd`: where the stages run (`check_config`'s directory; default the current one)."""
        self.c, self.wd = config, workdir
        self.env, self.cwd = dict(os.environ), cwd or os.getcwd()
        self.current: Round | None = None
        self.stop = threading.Event()  # set by SIGTERM: no stage starts any more
        owned = [o for o in config.train.overrides if o.split("=", 1)[0] in LOOP_OWNED]
        if owned:
            raise SystemExit(f"[loop] config.train.overrides: {owned} set fields the loop sets every round "
                             f"({', '.join(LOOP_OWNED)})")
        for field in ("policy", "train.config", "pool.train", "pool.heldout"):
            value = config
            for part in field.split("."):
                value = value[part]
            if not value:
                raise SystemExit(f"[loop] config.{field} is empty")
        if config.reference not in ("previous", "initial"):
            raise SystemExit(f"[loop] config.reference: {config.reference!r} is not 'previous' or 'initial'")
        rank = dict(o.split("=", 1) for o in config.train.overrides if "=" in o).get("lora.rank", "0")
        if rank.strip() not in ("0", "") and config.reference == "initial" and not config.ref_logps:
            raise SystemExit("[loop] config.reference: 'initial' with LoRA (train.overrides lora.rank) needs "
                             "config.ref_logps=True: a LoRA run's online reference is its own base, the previous "
                             "round's policy")

    def open(self, r: int) -> Round:
        self.current = Round(self.wd, r, self.env, self.cwd, self.stop)
        return self.current

    def terminate(self) -> None:
        """SIGTERM: the running stage gets it (a training run saves its step), no stage starts after it."""
        self.stop.set()
        if self.current is not None:
            self.current.terminate()

    def finish(self, R: Round, policy: str, note: str = "") -> None:
        R.m.update(status="done", policy_after=policy, note=note)
        R.save()
        row = summary.round_row(self.wd, R.r)
        summary.tensorboard(self.wd, row)

    def evaluate(self, R: Round, policy: str) -> None:
        c, pools = self.c, self.pools()
        judge = [f"--{k}={c.judge[k]}" for k in EVALUATE_JUDGE if c.judge[k] != ""]
        R.run("evaluate", lambda: (
            "rdpo_jax.evaluate",
            [f"--model={policy}", f"--pool={pools['heldout']}", f"--out={R.dir}/eval", *judge,
             *_flags(c.evaluate, skip=("initial",))],
            {"policy": policy, "pool": pools["heldout"]}, {"eval": f"{R.dir}/eval"}), finished=_evaluated)

    def pools(self) -> dict:
        with open(os.path.join(rounds_lib.round_dir(self.wd, 0), rounds_lib.MANIFEST)) as f:
            return json.load(f)["pools"]

    def round0(self) -> None:
        R = self.open(0)
        if R.done:
            return
        c, pools = self.c, {}
        for which in ("train", "heldout"):
            spec = c.pool[which]
            if spec.endswith(".jsonl"):
                out = os.path.join(self.wd, "pools")
                extra = [f"--endpoint={c.pool.endpoint}", f"--model={c.pool.model}"] if c.pool.generator == "openai" else []
                R.run(f"rubrics_{which}", lambda: (
                    "data_prep.build_rubrics",
                    [f"--input={spec}", f"--out={out}", f"--name={which}_pool", f"--generator={c.pool.generator}",
                     f"--chunk_size={c.chunk_size}", *extra],
                    {"prompts": spec}, {"pool": f"{out}/{which}_pool"}), finished=_dataset_written("pool"))
                pools[which] = R.stage(f"rubrics_{which}")["outputs"]["pool"]
            elif is_dataset(spec):
                pools[which] = os.path.abspath(spec)
            else:
                raise SystemExit(f"[loop] config.pool.{which}: {spec!r} is neither a prompts .jsonl file nor a "
                                 "dataset (folder/NAME with NAME.manifest.json)")
        R.m["pools"] = R.m.get("pools") or pools
        R.save()
        if c.evaluate.initial:
            self.evaluate(R, c.policy)
        else:
            R.skip("evaluate", "config.evaluate.initial is False")
        self.finish(R, c.policy)

    def round(self, r: int) -> None:
        with open(os.path.join(rounds_lib.round_dir(self.wd, r - 1), rounds_lib.MANIFEST)) as f:
            policy = json.load(f)["policy_after"]
        R = self.open(r)
        if R.done:
            return
        c, pool, out = self.c, self.pools()["train"], R.dir
        R.m.setdefault("policy_before", policy)
        R.save()
        if r == 1 and c.first_judged:
            for name in ("sample", "judge"):
                R.skip(name, f"round 1 mines config.first_judged {c.first_judged}")
            judged = c.first_judged
        else:
            R.run("sample", lambda: (
                "data_prep.sample",
                [f"--pool={pool}", f"--model={policy}", f"--out={out}", "--name=samples",
                 f"--seed={1000 * c.sample.seed + r}", f"--chunk_size={c.chunk_size}", *_flags(c.sample, skip=("seed",))],
                {"pool": pool, "policy": policy}, {"samples": f"{out}/samples"}), finished=_dataset_written("samples"))
            R.run("judge", lambda: (
                "data_prep.judge",
                [f"--pool={pool}", f"--samples={out}/samples", f"--out={out}", "--name=judged",
                 f"--chunk_size={c.chunk_size}", *_flags(c.judge)],
                {"pool": pool, "samples": f"{out}/samples"}, {"judged": f"{out}/judged"}),
                finished=_dataset_written("judged"))
            judged = f"{out}/judged"
        R.run("pairs", lambda: (
            "data_prep.make_pairs",
            [f"--pool={pool}", f"--judged={judged}", f"--out={out}", "--name=pairs", f"--chunk_size={c.chunk_size}",
             *_flags(c.pairs)],
            {"pool": pool, "judged": judged}, {"pairs": f"{out}/pairs"}), finished=_dataset_written("pairs"))
        with open(f"{out}/pairs.manifest.json") as f:
            count = json.load(f)["count"]
        if count == 0:
            for name in ("ref_logps", "train"):
                R.skip(name, "the miner found no pairs")
            self.evaluate(R, policy)
            self.finish(R, policy, note=f"no pairs: kept round {r - 1}'s policy")
            return
        reference = c.policy if c.reference == "initial" and policy != c.policy else ""
        config = [f"--config={c.train.config}", *(f"--config.{o}" for o in c.train.overrides),
                  f"--config.init_from={policy}", *([f"--config.dpo.reference_from={reference}"] if reference else [])]
        inputs = {"policy": policy, **({"reference": reference} if reference else {})}
        data = f"{out}/pairs"
        if c.ref_logps:
            config.append("--config.dpo.reference=precomputed")
            R.run("ref_logps", lambda: (
                "data_prep.ref_logps",
                [*config, f"--config.data.train={out}/pairs", f"--pairs={out}/pairs", f"--out={out}",
                 "--name=pairs_ref", f"--chunk_size={c.chunk_size}"],
                {"pairs": f"{out}/pairs", **inputs}, {"pairs_ref": f"{out}/pairs_ref"}),
                finished=_dataset_written("pairs_ref"))
            data = f"{out}/pairs_ref"
        else:
            R.skip("ref_logps", "config.ref_logps is False")
        R.run("train", lambda: (
            "rdpo_jax.train", [*config, f"--config.data.train={data}", f"--workdir={out}/run"],
            {"pairs": data, **inputs}, {"run": f"{out}/run"}), finished=_train_finished)
        self.evaluate(R, f"{out}/run")
        self.finish(R, f"{out}/run")


def _define_flags():
    config_flags.DEFINE_config_file("config", None, "The loop config (configs/NAME.py[:ARG]).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Everything the loop writes goes here (resumed when it exists).")
    flags.DEFINE_integer("rounds", 0, "Rounds to run in all (0: the config's `rounds`); raise it to continue.")
    flags.DEFINE_bool("allow_config_change", False, "Accept a config that differs from the recorded one: the new "
                      "values apply to the stages not started yet.")


def main(argv):
    del argv
    f = flags.FLAGS
    if f.config is None or not f.workdir:
        raise app.UsageError("--config and --workdir are required")
    if not f["verbosity"].present:  # the loop prints its own lines; orbax's (reading checkpoints) are noise here
        logging.set_verbosity(logging.ERROR)
    config, workdir = f.config, os.path.abspath(f.workdir)
    n = f.rounds or config.rounds
    loop = Loop(config, workdir, check_config(workdir, config, f.allow_config_change))
    stopping = loop.stop
    signal.signal(signal.SIGTERM, lambda *_: loop.terminate())
    t0 = time.perf_counter()
    try:
        loop.round0()
        for r in range(1, n + 1):
            if stopping.is_set():
                break
            loop.round(r)
            summary.write(workdir, r)
    except StageFailed:
        if stopping.is_set():
            raise SystemExit(f"[loop] SIGTERM: stopped during round {loop.current.r}; rerun the same command "
                             "to resume") from None
        raise
    finally:
        last = max((r for r in range(n + 1) if os.path.exists(os.path.join(rounds_lib.round_dir(workdir, r),
                                                                          rounds_lib.MANIFEST))), default=0)
        table = summary.write(workdir, last)
    if stopping.is_set():
        raise SystemExit("[loop] SIGTERM: stopped between stages; rerun the same command to resume")
    print("\n" + table)
    print(f"\n[loop] {n} rounds in {workdir} ({(time.perf_counter() - t0) / 60:.1f} minutes this run); table: "
          f"{workdir}/summary.md; report: {workdir}/report.html; TensorBoard: {workdir}/tensorboard", flush=True)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
