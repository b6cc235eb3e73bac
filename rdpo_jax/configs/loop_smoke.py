"""Two rounds of the loop on the files of `python -m rdpo_jax.data_prep.smoke --out=DIR` (a few minutes on a CPU).

    python -m rdpo_jax.data_prep.smoke --out=/tmp/smoke
    python -m rdpo_jax.loop --config=rdpo_jax/configs/loop_smoke.py:dir=/tmp/smoke --workdir=/tmp/loop

Arguments: dir (required), reference (previous | initial), ref_logps (0 | 1). Round 0 builds the rubric
pools from DIR/prompts.jsonl and DIR/heldout_prompts.jsonl; each round samples the current policy 4 times
per prompt, judges with the verifier, mines rubric pairs and trains 4 DPO steps of
rdpo_jax/configs/smoke.py from it. The tiny random model learns nothing; the point is every stage.
"""

from rdpo_jax.configs import loop_base


def get_config(arg: str = ""):
    from rdpo_jax.configs import base

    args = base.parse_arg(arg, "rdpo_jax/configs/loop_smoke.py", required=("dir",), optional=("reference", "ref_logps"))
    c = loop_base.get_config()
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
    c.train.config = f"rdpo_jax/configs/smoke.py:dir={d}"
    c.train.overrides = ("total_steps=4", "data.eval=")
    c.evaluate.max_new_tokens = 8
    c.evaluate.batch_size = 8
    return c
