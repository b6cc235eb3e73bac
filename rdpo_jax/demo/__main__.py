"""`make demo`: the whole rDPO loop on a CPU, on a world where the truth is known.

    python -m rdpo_jax.demo [--workdir=demo_workdir] [--budget=full|tiny] [--seeds=1] [--rounds=1] [--fresh]
        [--family=llava|qwen2_5_vl]

Stages (each a real command in a subprocess, as a TPU user runs them; a finished stage is recorded in
WORKDIR/stages/ and skipped on the next run unless --fresh):
  world       scenes, the trained tokenizer, a tiny LLaVA (or Qwen2.5-VL) HF folder, imperfect SFT data,
              prompt files
  rubrics     rdpo_jax.data_prep.build_rubrics --generator=rule (train and held-out pools)
  sft         rdpo_jax.train rdpo_jax/configs/demo.py objective=sft (the warm start = the "base" row)
  per seed:   rdpo_jax.data_prep.sample → rdpo_jax.data_prep.judge (verifier) → rdpo_jax.data_prep.make_pairs (rubric miner, and
              the outcome miner on final-answer correctness) → rdpo_jax.train for each arm; with
              --rounds=N each arm then repeats sample → judge → its miner → train from its own policy
  evaluate    rdpo_jax.evaluate on the held-out pool: base and every arm (one process; models that
              already have their metrics are skipped)
  report      the table (printed, WORKDIR/results.md) and WORKDIR/report.html
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

from absl import app, flags, logging

from rdpo_jax.demo import report, world

ARMS = {  # name: (pairs miner, loss type)
    "outcome+sigmoid": ("outcome", "sigmoid"),
    "rubric+sigmoid": ("rubric", "sigmoid"),
    "rubric+rubric": ("rubric", "rubric"),
}
BUDGETS = {  # the full demo (≤ 10 minutes on 2 cores) and the test suite's fast variant
    "full": dict(sft_examples=3000, sft_steps=1500, train_prompts=512, heldout_prompts=384, samples=8,
                 dpo_steps=80, max_new_tokens=56),
    "tiny": dict(sft_examples=96, sft_steps=4, train_prompts=16, heldout_prompts=12, samples=4, dpo_steps=2,
                 max_new_tokens=12),
}


# The demo's model is tiny: a copy per device decodes faster than parameters split over them (the
# commands' default, for models that do not fit one device).
TINY_MODEL_MESH = "--mesh=data=-1"


def _define_flags() -> None:
    """The command's flags (only when run as a command: importing this module defines none)."""
    flags.DEFINE_string("workdir", "demo_workdir", "Everything the demo writes goes here.")
    flags.DEFINE_enum("budget", "full", list(BUDGETS), "full: the demo; tiny: a fast check of every stage.")
    flags.DEFINE_integer("seeds", 1, "Seeds of the on-policy round and DPO runs (the table shows the spread).")
    flags.DEFINE_integer("rounds", 1, "On-policy rounds per arm: round 1 samples the SFT policy (shared by the "
                         "arms); each later round samples the arm's own policy and trains on from it.")
    flags.DEFINE_bool("fresh", False, "Delete the workdir first instead of reusing finished stages.")
    flags.DEFINE_integer("devices", 2, "Simulated CPU devices for the commands (data parallel).")
    flags.DEFINE_enum("family", "llava", world.FAMILIES, "The policy's model family (same widths either way).")


class Demo:
    def __init__(self, workdir: str, budget: dict, devices: int, family: str = "llava"):
        self.wd, self.budget, self.family = os.path.abspath(workdir), budget, family
        self.stages = os.path.join(self.wd, "stages")
        os.makedirs(self.stages, exist_ok=True)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        # the caller's XLA flags carry on to the stages, with this demo's device count
        xla = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        self.env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
                        XLA_FLAGS=" ".join([*xla, f"--xla_force_host_platform_device_count={devices}"]),
                        JAX_COMPILATION_CACHE_DIR=os.path.join(self.wd, "jax_cache"),
                        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                        PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.cwd = root

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
        world.write_prompts(w, "train_prompts", n=b["train_prompts"], seed=2, describe_share=0.5)
        # a third of the held-out prompts are descriptions: where hallucinations (absent objects) are scored
        world.write_prompts(w, "heldout_prompts", n=b["heldout_prompts"], seed=3, describe_share=1 / 3)
        with open(os.path.join(w, "world.json"), "w") as f:
            json.dump({"sft": stats, "family": self.family, **b}, f, indent=2)

    def rubrics(self) -> None:
        for name in ("train", "heldout"):
            self.command("rdpo_jax.data_prep.build_rubrics", f"--input={self.path('world', name + '_prompts.jsonl')}",
                         f"--out={self.path('rubrics')}", f"--name={name}_pool")

    def sft(self) -> None:
        self.command("rdpo_jax.train", f"--config=rdpo_jax/configs/demo.py:dir={self.wd},objective=sft,"
                     f"family={self.family},"
                     f"steps={self.budget['sft_steps']}", f"--workdir={self.path('sft')}")

    def round_dir(self, seed: int, arm: str, r: int) -> str:
        """Round 1 samples the SFT policy once for every arm; later rounds sample each arm's own policy."""
        return self.path(f"seed{seed}", "round1") if r == 1 else self.path(f"seed{seed}", f"{arm}-round{r}")

    def run_dir(self, seed: int, arm: str, r: int) -> str:
        return self.path(f"seed{seed}", arm if r == 1 else f"{arm}-round{r}", *(["run"] if r > 1 else []))

    def eval_dir(self, seed: int, arm: str, r: int) -> str:
        return self.path("eval", f"seed{seed}", arm if r == 1 else f"{arm}-round{r}")

    def rows(self, seeds: list[int], rounds: int) -> list[dict]:
        """The table's rows: the base, then every arm after each round (eval dirs, runs, pairs per seed)."""
        rows = [{"name": "base (SFT)", "evals": [self.path("eval", "base")], "runs": [self.path("sft")],
                 "pairs": None}]
        for arm, (miner, _) in ARMS.items():
            for r in range(1, rounds + 1):
                rows.append({"name": arm if r == 1 else f"{arm} round {r}",
                             "evals": [self.eval_dir(s, arm, r) for s in seeds],
                             "runs": [self.run_dir(s, arm, r) for s in seeds],
                             "pairs": [os.path.join(self.round_dir(s, arm, r), f"pairs_{miner}.manifest.json")
                                       for s in seeds]})
        return rows

    def round(self, seed: int, policy: str, out: str, r: int, miners: tuple[str, ...]) -> None:
        b, pool = self.budget, self.path("rubrics", "train_pool")
        self.command("rdpo_jax.data_prep.sample", f"--pool={pool}", f"--model={policy}", f"--n={b['samples']}",
                     "--temperature=1.0", f"--max_new_tokens={b['max_new_tokens']}", "--batch_size=32",
                     f"--seed={100 * seed + r}", f"--out={out}", TINY_MODEL_MESH)
        self.command("rdpo_jax.data_prep.judge", f"--pool={pool}", f"--samples={out}/samples", "--judge=verifier",
                     f"--out={out}")
        if "rubric" in miners:
            self.command("rdpo_jax.data_prep.make_pairs", f"--pool={pool}", f"--judged={out}/judged", "--miner=rubric",
                         "--gate=veto", "--margin=0.1", "--max_pairs=2", f"--out={out}", "--name=pairs_rubric")
        if "outcome" in miners:
            self.command("rdpo_jax.data_prep.make_pairs", f"--pool={pool}", f"--judged={out}/judged", "--miner=outcome",
                         "--outcome=correct", "--margin=0.5", "--max_pairs=2", f"--out={out}",
                         "--name=pairs_outcome")

    def train_arm(self, seed: int, arm: str, r: int) -> None:
        """DPO on the round's pairs from the arm's previous policy (also the reference: iterative DPO)."""
        miner, loss = ARMS[arm]
        pairs = os.path.join(self.round_dir(seed, arm, r), f"pairs_{miner}")
        init = self.path("sft") if r == 1 else self.run_dir(seed, arm, r - 1)
        with open(pairs + ".manifest.json") as f:
            mined = json.load(f)["count"]
        if not mined:  # nothing to learn from: the arm's policy after this round is the one before it
            print(f"[demo] {arm} round {r}, seed {seed}: the miner found no pairs; the policy stays {init}")
            run = self.run_dir(seed, arm, r)
            os.makedirs(os.path.dirname(run), exist_ok=True)
            if os.path.lexists(run):
                shutil.rmtree(run) if not os.path.islink(run) else os.remove(run)
            os.symlink(init, run)
            return
        self.command("rdpo_jax.train", f"--config=rdpo_jax/configs/demo.py:dir={self.wd},objective=dpo,"
                     f"family={self.family},pairs={pairs},"
                     f"loss={loss},steps={self.budget['dpo_steps']},seed={seed},init={init}",
                     f"--workdir={self.run_dir(seed, arm, r)}")

    def evaluate(self, models: list[str], outs: list[str]) -> None:
        self.command("rdpo_jax.evaluate", f"--model={','.join(models)}", f"--out={','.join(outs)}",
                     f"--pool={self.path('rubrics', 'heldout_pool')}", "--group=prefix", "--batch_size=64",
                     f"--max_new_tokens={self.budget['max_new_tokens']}", TINY_MODEL_MESH)


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    t0 = time.perf_counter()
    f = flags.FLAGS
    if f.fresh and os.path.exists(f.workdir):
        shutil.rmtree(f.workdir)
    d = Demo(f.workdir, BUDGETS[f.budget], f.devices, f.family)
    made = d.path("world", "world.json")
    if os.path.exists(made):
        with open(made) as fh:
            family = json.load(fh).get("family", "llava")
        if family != f.family:
            raise SystemExit(f"[demo] {f.workdir} holds a {family} world; --family={f.family} needs --fresh "
                             "or another --workdir")
    d.stage("world", d.make_world)
    d.stage("rubrics", d.rubrics)
    d.stage("sft", d.sft)
    seeds = list(range(f.seeds))
    for seed in seeds:
        d.stage(f"round/seed{seed}", lambda: d.round(seed, d.path("sft"), d.round_dir(seed, "", 1), 1,
                                                     ("rubric", "outcome")))
        for arm in ARMS:
            for r in range(1, f.rounds + 1):
                if r > 1:
                    d.stage(f"round{r}/seed{seed}/{arm}", lambda: d.round(
                        seed, d.run_dir(seed, arm, r - 1), d.round_dir(seed, arm, r), r, (ARMS[arm][0],)))
                d.stage(f"train{'' if r == 1 else r}/seed{seed}/{arm}", lambda: d.train_arm(seed, arm, r))
    rows = d.rows(seeds, f.rounds)
    todo = [(run, ev) for row in rows for run, ev in zip(row["runs"], row["evals"])
            if not os.path.exists(os.path.join(ev, "metrics.json"))]
    if todo:  # one process for every model not evaluated yet: the sampler compiles once
        d.stage("evaluate", lambda: d.evaluate(*map(list, zip(*todo))), reuse=False)
    else:
        print("[demo] evaluate: done before (every model has its metrics), reused")
    minutes = (time.perf_counter() - t0) / 60
    table = report.write(d.wd, rows, seeds=seeds, minutes=minutes, budget={**d.budget, "rounds": f.rounds})
    print("\n" + table)
    print(f"\n[demo] {minutes:.1f} minutes; table: {d.path('results.md')}; report: {d.path('report.html')}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
