"""Tiny CPU smoke run on the files of `python -m data_prep.smoke --out=DIR` (well under a minute here).

    python -m data_prep.smoke --out=/tmp/smoke
    python -m rdpo_jax.train --config=configs/smoke.py:dir=/tmp/smoke --workdir=/tmp/run
    python -m rdpo_jax.train --config=configs/smoke.py:dir=/tmp/smoke,objective=sft --workdir=/tmp/run_sft

The argument is `key=value` pairs: dir (required), objective (dpo | sft), family (llava | qwen2_5_vl |
qwen3_vl: the family `data_prep.smoke --family` wrote; Qwen-VL records hold 0–2 images of any size).
"""

from rdpo_jax import defaults
from rdpo_jax.models import families


def get_config(arg: str = ""):
    args = defaults.parse_arg(arg, "configs/smoke.py", required=("dir",), optional=("objective", "family"))
    c = defaults.train()
    d = args["dir"]
    c.objective = args.get("objective", "dpo")
    c.model.path = f"{d}/model"
    c.init_from = "model"
    c.total_steps = 6
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 2, 2
    c.data.train = f"{d}/pairs" if c.objective == "dpo" else f"{d}/sft"
    c.data.eval = f"{d}/pairs_eval" if c.objective == "dpo" else ""
    c.data.batch_size = 8
    c.data.seq_buckets = (48,)
    c.data.max_answer_len = 8
    c.data.max_criteria = 4
    c.dpo.loss_type = "rubric"
    c.dpo.beta = 0.5
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 1
    families.get(args.get("family", "llava")).tiny.smoke_config(c)  # the tower frozen, the family's records
    c.checkpoint.every = 2
    c.checkpoint.keep = 2
    c.log.every = 1
    c.eval.every = 0  # evaluate at the end
    c.eval.batches = 1
    return c
