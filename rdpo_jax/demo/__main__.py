"""`make demo`: the whole rDPO loop on a CPU, on a world where the truth is known.

    python -m rdpo_jax.demo [--workdir=demo_workdir] [--budget=full|tiny] [--seeds=1] [--rounds=1] [--fresh]
        [--family=llava|qwen2_5_vl|qwen3_vl] [--sft_steps=N]

Stages (each a real command in a subprocess, as a TPU user runs them; a finished stage is recorded in
WORKDIR/stages/ and skipped on the next run unless --fresh):
  world       scenes, the trained tokenizer, a tiny LLaVA (or Qwen2.5-VL) HF folder, imperfect SFT data,
              prompt files
  rubrics     data_prep.build_rubrics --generator=rule (train and held-out pools)
  sft         rdpo_jax.train configs/demo.py objective=sft (the warm start = the "base" row)
  per seed:   data_prep.sample → data_prep.judge (verifier): the SFT policy's answers,
              shared by every arm's first round
  per arm:    rdpo_jax.loop (configs/loop_demo.py; WORKDIR/seedS/ARM): each round mines pairs
              with the arm's miner (rubric, or the outcome miner on final-answer correctness), trains
              rdpo_jax.train from the arm's previous policy and evaluates it on the held-out pool; round 2
              on samples and judges the arm's own policy first (--rounds=N). Always called: the loop
              itself skips what it finished (and continues when --rounds is raised)
  evaluate    rdpo_jax.evaluate of the SFT policy on the held-out pool (the table's "base" row)
  report      the table (printed, WORKDIR/results.md) and WORKDIR/report.html
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags, logging

import rdpo_jax
from rdpo_jax.demo import ARMS, report, world
from rdpo_jax.models import families

BUDGETS = {  # the full demo (≤ 10 minutes on 2 cores) and the test suite's fast variant
    "full": dict(sft_examples=24000, sft_steps=3000, train_prompts=512, heldout_prompts=384, samples=8,
                 dpo_steps=80, max_new_tokens=70, eval_samples=4),
    "tiny": dict(sft_examples=96, sft_steps=4, train_prompts=16, heldout_prompts=12, samples=4, dpo_steps=2,
                 max_new_tokens=12, eval_samples=2),
}


# The demo's model is tiny: a copy per device decodes faster than parameters split over them (the
# commands' default, for models that do not fit one device).
TINY_MODEL_MESH = "--mesh=data=-1"


def configs_dir() -> Path:
    """The checkout's configs/, which the stages' commands load by path (`pip install` does not ship them)."""
    path = Path(rdpo_jax.__file__).resolve().parents[1] / "configs"
    if not (path / "loop_demo.py").is_file():
        raise SystemExit(f"[demo] {path}/loop_demo.py is missing: the demo runs the configs of a checkout; run "
                         "`python -m rdpo_jax.demo` from the root of a clone of the repository")
    return path


def _define_flags() -> None:
    """The command's flags (only when run as a command: importing this module defines none)."""
    flags.DEFINE_string("workdir", "demo_workdir", "Everything the demo writes goes here.")
    flags.DEFINE_enum("budget", "full", list(BUDGETS), "full: the demo; tiny: a fast check of every stage.")
    flags.DEFINE_integer("seeds", 1, "Seeds of the on-policy round and DPO runs (the table shows the spread).")
    flags.DEFINE_integer("rounds", 1, "On-policy rounds per arm (the loop's --rounds): round 1 samples the SFT policy "
                         "(shared by the arms); each later round samples the arm's own policy and trains on from it.")
    flags.DEFINE_bool("fresh", False, "Delete the workdir first instead of reusing finished stages.")
    flags.DEFINE_integer("devices", 2, "Simulated CPU devices for the commands (data parallel).")
    flags.DEFINE_enum("family", "llava", list(families.FAMILIES), "The policy's model family (same widths either way).")
    flags.DEFINE_integer("sft_steps", None, "SFT warm-start steps (default: the budget's).")


class Demo:
    def __init__(self, workdir: str, budget: dict, devices: int, family: str = "llava"):
        self.wd, self.budget, self.family = os.path.abspath(workdir), budget, family
        self.stages = os.path.join(self.wd, "stages")
        os.makedirs(self.stages, exist_ok=True)
        self.configs = configs_dir()
        root = self.configs.parent  # the checkout: the stages run there, with its packages first
        # the caller's XLA flags carry on to the stages, with this demo's device count
        xla = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        self.env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
                        XLA_FLAGS=" ".join([*xla, f"--xla_force_host_platform_device_count={devices}"]),
                        JAX_COMPILATION_CACHE_DIR=os.path.join(self.wd, "jax_cache"),
                        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                        PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.cwd = str(root)

    def stage(self, name: str, fn, *, reuse: bool = True) -> dict:
        """Runs `fn` unless stage `name` finished before (and `reuse`); records its time."""
        path = os.path.join(self.stages, name.replace("/", "_") + ".json")
        if reuse and os.path.exists(path):
            with open(path) as f:
                done = json.load(f)
            print(f"[demo] {name}: done before ({done['seconds']:.0f} s), reused")
            return done
        print(f"[demo] {name} …", flush=True)
        t0 = time.perf_counter()
        fn()
        done = {"stage": name, "seconds": round(time.perf_counter() - t0, 1)}
        with open(path, "w") as f:
            json.dump(done, f)
        print(f"[demo] {name}: {done['seconds']:.0f} s", flush=True)
        return done

    def command(self, *args: str) -> None:
        """`python -m ARGS` in a subprocess; its output goes to WORKDIR/logs, shown when it fails."""
        log_dir = os.path.join(self.wd, "logs")
        os.makedirs(log_dir, exist_ok=True)
        log = os.path.join(log_dir, f"{len(os.listdir(log_dir)):02d}-{args[0]}.log")
        with open(log, "w") as f:
            f.write("$ python -m " + " ".join(args) + "\n")
            f.flush()
            proc = subprocess.run([sys.executable, "-m", *args], cwd=self.cwd, env=self.env, stdout=f,
                                  stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            with open(log) as f:
                tail = f.read()[-4000:]
            raise SystemExit(f"[demo] failed: python -m {' '.join(args)} (exit {proc.returncode}; log {log}):\n{tail}")

    def path(self, *parts: str) -> str:
        return os.path.join(self.wd, *parts)

    # ----- the stages -----

    def make_world(self) -> None:
        b, w = self.budget, self.path("world")
        world.write_model(os.path.join(w, "model"), family=self.family)
        stats = world.write_sft(w, "sft", n=b["sft_examples"], seed=1, imperfect_share=0.3)
        world.write_prompts(w, "train_prompts", n=b["train_prompts"], seed=2, open_share=0.5)
        # a third of the held-out prompts are open (describe, list): where hallucinations (absent objects) are scored
        world.write_prompts(w, "heldout_prompts", n=b["heldout_prompts"], seed=3, open_share=1 / 3)
        with open(os.path.join(w, "world.json"), "w") as f:
            json.dump({"sft": stats, "family": self.family, **b}, f, indent=2)

    def rubrics(self) -> None:
        for name in ("train", "heldout"):
            self.command("data_prep.build_rubrics", f"--input={self.path('world', name + '_prompts.jsonl')}",
                         f"--out={self.path('rubrics')}", f"--name={name}_pool")

    def sft(self) -> None:
        self.command("rdpo_jax.train", f"--config={self.configs}/demo.py:dir={self.wd},objective=sft,"
                     f"family={self.family},"
                     f"steps={self.budget['sft_steps']}", f"--workdir={self.path('sft')}")

    def round_dir(self, seed: int, arm: str, r: int) -> str:
        """Round r of the arm's loop (its run, pairs and evaluation)."""
        return self.path(f"seed{seed}", arm, f"round_{r:03d}")

    def rows(self, seeds: list[int], rounds: int) -> list[dict]:
        """The table's rows: the base, then every arm after each round (eval dirs, runs, pairs per seed)."""
        rows = [{"name": "base (SFT)", "arm": None, "round": 0, "evals": [self.path("eval", "base")],
                 "runs": [self.path("sft")], "pairs": None}]
        for arm in ARMS:
            for r in range(1, rounds + 1):
                dirs = [self.round_dir(s, arm, r) for s in seeds]
                rows.append({"name": arm if r == 1 else f"{arm} round {r}", "arm": arm, "round": r,
                             "evals": [f"{d}/eval" for d in dirs],
                             "runs": [f"{d}/run" for d in dirs], "pairs": [f"{d}/pairs.manifest.json" for d in dirs]})
        return rows

    def sample_sft(self, seed: int) -> None:
        """The SFT policy's judged answers to the train pool: every arm's first round mines them."""
        b, pool, out = self.budget, self.path("rubrics", "train_pool"), self.path(f"seed{seed}", "round1")
        self.command("data_prep.sample", f"--pool={pool}", f"--model={self.path('sft')}", f"--n={b['samples']}",
                     "--temperature=1.0", f"--max_new_tokens={b['max_new_tokens']}", "--batch_size=32",
                     f"--seed={100 * seed + 1}", f"--out={out}", TINY_MODEL_MESH)
        self.command("data_prep.judge", f"--pool={pool}", f"--samples={out}/samples", "--judge=verifier",
                     f"--out={out}")

    def loop(self, seed: int, arm: str, rounds: int) -> None:
        b = self.budget
        self.command("rdpo_jax.loop", f"--config={self.configs}/loop_demo.py:dir={self.wd},arm={arm},seed={seed},"
                     f"family={self.family},samples={b['samples']},steps={b['dpo_steps']},tokens={b['max_new_tokens']},"
                     f"eval_samples={b['eval_samples']}",
                     f"--workdir={self.path(f'seed{seed}', arm)}", f"--rounds={rounds}")

    def evaluate(self, models: list[str], outs: list[str]) -> None:
        self.command("rdpo_jax.evaluate", f"--model={','.join(models)}", f"--out={','.join(outs)}",
                     f"--pool={self.path('rubrics', 'heldout_pool')}", "--group=prefix", "--batch_size=64",
                     f"--max_new_tokens={self.budget['max_new_tokens']}", f"--samples={self.budget['eval_samples']}",
                     TINY_MODEL_MESH)


def _check_world(world_json: str, settings: dict, workdir: str) -> None:
    """Refuses a workdir whose world (recorded in world/world.json) was made with other settings — the
    family or any budget value (--budget, --sft_steps): its finished stages would be reused as they are."""
    if not os.path.exists(world_json):
        return
    with open(world_json) as fh:
        made = json.load(fh)
    differ = [f"{k}={made[k]} (this run: {v})" for k, v in settings.items() if k in made and made[k] != v]
    if differ:
        raise SystemExit(f"[demo] {workdir} holds a world made with {', '.join(differ)}; its finished stages would be "
                         "reused: pass --fresh, another --workdir, or the settings it was made with")


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    t0 = time.perf_counter()
    f = flags.FLAGS
    if f.fresh and os.path.exists(f.workdir):
        shutil.rmtree(f.workdir)
    budget = dict(BUDGETS[f.budget], **({} if f.sft_steps is None else {"sft_steps": f.sft_steps}))
    d = Demo(f.workdir, budget, f.devices, f.family)
    _check_world(d.path("world", "world.json"), {"family": f.family, **budget}, f.workdir)
    d.stage("world", d.make_world)
    d.stage("rubrics", d.rubrics)
    d.stage("sft", d.sft)
    seeds = list(range(f.seeds))
    for seed in seeds:
        d.stage(f"round/seed{seed}", lambda: d.sample_sft(seed))
        for arm in ARMS:
            d.stage(f"loop/seed{seed}/{arm}", lambda: d.loop(seed, arm, f.rounds), reuse=False)
    rows = d.rows(seeds, f.rounds)
    if not os.path.exists(d.path("eval", "base", "metrics.json")):
        d.stage("evaluate", lambda: d.evaluate([d.path("sft")], [d.path("eval", "base")]), reuse=False)
    else:
        print("[demo] evaluate: done before (the base has its metrics), reused")
    minutes = (time.perf_counter() - t0) / 60
    table = report.write(d.wd, rows, seeds=seeds, minutes=minutes, budget={**d.budget, "rounds": f.rounds})
    print("\n" + table)
    print(f"\n[demo] {minutes:.1f} minutes; table: {d.path('results.md')}; report: {d.path('report.html')}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
