"""Two rounds of the loop on the files of `python -m data_prep.smoke --out=DIR` (a few minutes on a CPU).

    python -m data_prep.smoke --out=/tmp/smoke
    python -m rdpo_jax.loop --config=configs/loop_smoke.py:dir=/tmp/smoke --workdir=/tmp/loop

Arguments: dir (required), reference (previous | initial), ref_logps (0 | 1). Round 0 builds the rubric
pools from DIR/prompts.jsonl and DIR/heldout_prompts.jsonl; each round samples the current policy 4 times
per prompt, judges with the verifier, mines rubric pairs and trains 4 DPO steps of
configs/smoke.py from it. The tiny random model learns nothing; the point is every stage.
"""

import os

from rdpo_jax import defaults

SMOKE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "smoke.py")  # from any working directory


def get_config(arg: str = ""):
    args = defaults.parse_arg(arg, "configs/loop_smoke.py", required=("dir",), optional=("reference", "ref_logps"))
    c = defaults.loop()
    d = args["dir"]
    c.rounds = 2
    c.policy = f"{d}/model"
    c.reference = args.get("reference", "previous")
    c.ref_logps = bool(int(args.get("ref_logps", 0)))
    c.chunk_size = 8
    c.pool.train = f"{d}/prompts.jsonl"
    c.pool.heldout = f"{d}/heldout_prompts.jsonl"
    c.sample.n = 4
    c.sample.max_new_tokens = 8
    c.sample.batch_size = 4
    c.pairs.margin = 0.05
    c.train.config = f"{SMOKE}:dir={d}"
    c.train.overrides = ("total_steps=4", "data.eval=")
    c.evaluate.max_new_tokens = 8
    c.evaluate.batch_size = 8
    return c
