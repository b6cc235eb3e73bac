"""The demo's on-policy rounds for one arm and seed (`python -m rdpo_jax.demo` runs one loop per arm):

    python -m rdpo_jax.loop --config=configs/loop_demo.py:dir=WD,arm=rubric+rubric --workdir=WD/seed0/rubric+rubric

Arguments: dir (the demo workdir, required), arm (outcome+sigmoid | rubric+sigmoid | rubric+rubric: the
pairs miner and the DPO loss), seed, family (the world's model family), samples (per prompt), steps (DPO
steps per round), tokens (new tokens per answer), eval_samples (sampled answers per held-out prompt, besides
the greedy one). The initial policy is the SFT run; round 1 mines the
SFT policy's judged samples that the demo drew once for every arm (WD/seedS/round1/judged), later rounds
sample the arm's own policy. Each round trains on from the previous policy, which is also the reference
(iterative DPO); the demo evaluates the SFT policy itself, once.
"""

import os

from rdpo_jax import defaults
from rdpo_jax.demo import ARMS

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")  # from any working directory


def get_config(arg: str = ""):
    args = defaults.parse_arg(arg, "configs/loop_demo.py", required=("dir", "arm"),
                              optional=("seed", "family", "samples", "steps", "tokens", "eval_samples"))
    if args["arm"] not in ARMS:
        raise ValueError(f"configs/loop_demo.py: arm={args['arm']!r} is not one of {list(ARMS)}")
    miner, loss = ARMS[args["arm"]]
    d, seed, tokens = args["dir"], int(args.get("seed", 0)), int(args.get("tokens", 70))
    c = defaults.loop()
    c.rounds = 1
    c.policy = f"{d}/sft"
    c.reference = "previous"
    c.first_judged = f"{d}/seed{seed}/round1/judged"
    c.pool.train = f"{d}/rubrics/train_pool"
    c.pool.heldout = f"{d}/rubrics/heldout_pool"
    c.sample.n = int(args.get("samples", 8))
    c.sample.max_new_tokens = tokens
    c.sample.batch_size = 32
    c.sample.seed = seed
    c.sample.mesh = "data=-1"  # a copy of the tiny model per device decodes faster than a split one
    c.pairs.miner = miner
    c.pairs.max_pairs = 2
    if miner == "rubric":
        c.pairs.gate, c.pairs.margin = "veto", 0.1
    else:  # final-answer correctness only
        c.pairs.outcome, c.pairs.margin = "correct", 0.5
    c.train.config = (f"{DEMO}:dir={d},objective=dpo,family={args.get('family', 'llava')},"
                      f"loss={loss},steps={args.get('steps', 80)},seed={seed}")
    c.evaluate.initial = False
    c.evaluate.max_new_tokens = tokens
    c.evaluate.batch_size = 64
    c.evaluate.group = "prefix"
    c.evaluate.mesh = "data=-1"
    c.evaluate.samples = int(args.get("eval_samples", 4))  # and answers at temperature 1: what the policy samples
    c.evaluate.seed = seed
    return c
