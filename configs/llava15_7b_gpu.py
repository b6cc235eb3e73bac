"""rDPO of a LLaVA-1.5-7B-class model on one host with 8 GPUs (80 GB each, e.g. H100).

    python -m rdpo_jax.train --config=configs/llava15_7b_gpu.py:model=/ckpt/llava-1.5-7b-hf,data=/data/pairs \\
        --workdir=/runs/rdpo-7b

Memory per GPU: fp32 policy + Adam 7.1B × 12 B / 8 = 10.7 GB, fp32 frozen reference 3.6 GB, activations
of 2 pairs × 2048 tokens per micro-batch with dots-saveable remat ~20 GB. FSDP over the 8 GPUs; 32 pairs
per step as 2 accumulated micro-batches of 16.
"""

from rdpo_jax import defaults


def get_config(arg: str = ""):
    args = defaults.parse_arg(arg, "configs/llava15_7b_gpu.py", required=("model", "data"), optional=("eval",))
    c = defaults.train()
    c.objective = "dpo"
    c.model.path = args["model"]
    c.model.param_dtype = "float32"
    c.model.dtype = "bfloat16"
    c.model.remat = "dots_saveable"
    c.init_from = "model"
    c.total_steps = 2000
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 8, 1
    c.data.train = args["data"]
    c.data.eval = args.get("eval", "")
    c.data.batch_size = 32
    c.data.seq_buckets = (1024, 1536, 2048)
    c.data.max_answer_len = 512
    c.data.workers = 8
    c.accum_steps = 2
    c.dpo.loss_type = "rubric"
    c.dpo.beta = 0.1
    c.optim.learning_rate = 5e-7
    c.optim.warmup_steps = 100
    c.optim.freeze = "vision_tower/.*"
    c.checkpoint.every = 200
    c.eval.every = 200
    return c
