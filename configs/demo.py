"""The demo's runs (`python -m rdpo_jax.demo` writes the world and calls these): an SFT warm start and
DPO arms on the pairs of one on-policy round.

    python -m rdpo_jax.train --config=configs/demo.py:dir=WD,objective=sft --workdir=WD/sft
    python -m rdpo_jax.train --config=configs/demo.py:dir=WD,objective=dpo,pairs=WD/round1/pairs_rubric,loss=rubric \\
        --workdir=WD/arm_rubric

Arguments: dir (the demo workdir, required), objective (sft | dpo), pairs (dpo: the pairs dataset; the
demo's loop sets data.train instead),
loss (dpo: a loss type), steps (override the step budget), seed, init (dpo: the policy to start from and
use as reference; default the SFT run), family (a `models/families.py` model type: the world's model family).
"""

from rdpo_jax import defaults
from rdpo_jax.models import families


def get_config(arg: str = ""):
    args = defaults.parse_arg(arg, "configs/demo.py", required=("dir",),
                              optional=("objective", "pairs", "loss", "steps", "seed", "init", "family"))
    c = defaults.train()
    d = args["dir"]
    c.objective = args.get("objective", "sft")
    c.seed = c.data.seed = int(args.get("seed", 0))
    c.model.path = f"{d}/world/model"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
    c.data.max_answer_len = 70  # the longest answer (a tagged presence answer with a hallucinated 4th object) is 69 words: 70 tokens with the end of turn
    c.data.max_criteria = 16
    c.optim.grad_clip = 1.0
    c.optim.weight_decay = 0.0
    c.log.every = 10
    c.checkpoint.keep = 1
    if c.objective == "sft":
        c.init_from = "model"  # the world's randomly initialized HF folder
        c.total_steps = int(args.get("steps", 3000))
        c.data.train = f"{d}/world/sft"
        c.data.batch_size = 16
        # An example is its prompt (16 image tokens, ≤ 28 in all) and answer (≤ 70): 59 tokens on average. Up
        # to four share a row of 128 or 160 tokens, 8 rows a batch: 71 row slots an example and 14% padding,
        # against 100 slots and 40% padding one to a row of 100 (two never fit one row of 100): 0.078 s a
        # step instead of 0.108 on 2 cores, two compiled programs.
        c.data.seq_buckets = (128, 160)
        c.data.groups_per_row = 4
        c.optim.learning_rate = 1e-3  # 2e-3 and higher multipliers on the vision tower never learn to see
        c.optim.warmup_steps = 20
    else:
        c.init_from = args.get("init", f"{d}/sft")  # the policy trained on; also the frozen reference
        c.total_steps = int(args.get("steps", 80))
        c.data.train = args.get("pairs", "")  # the loop sets data.train every round
        c.data.batch_size = 16
        c.data.seq_buckets = (168,)  # prompt (≤ 28) + chosen + rejected (≤ 70 each) in one row (shared prefix)
        c.dpo.loss_type = args.get("loss", "sigmoid")
        c.dpo.beta = 0.1
        c.dpo.reference = "model"
        c.dpo.sft_weight = 1.0  # without it, 80 steps at 1e-4 cost the SFT policy up to half its essential pass
        c.optim.learning_rate = 1e-4  # 5e-4 degenerates (repetitions); 3e-5 barely moves the policy
        c.optim.warmup_steps = 5
    families.get(args.get("family", "llava")).tiny.demo_config(c)
    c.checkpoint.every = c.total_steps
    return c
