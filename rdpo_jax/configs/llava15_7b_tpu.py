"""rDPO of a LLaVA-1.5-7B-class model (CLIP ViT-L/336 + Llama-2-7B, 576 image tokens) on a TPU v5p-64
slice: 32 chips on 8 hosts (run on every host: see launch/tpu_vm.sh).

    python -m rdpo_jax.train --config=rdpo_jax/configs/llava15_7b_tpu.py:model=/gcs/b/llava-1.5-7b-hf,data=/gcs/b/pairs \\
        --workdir=/gcs/b/runs/rdpo-7b

(/gcs/b: a Cloud Storage bucket mounted with gcsfuse at the same path on every host.)

Memory per chip (95 GB HBM): fp32 policy + Adam ≈ 7.1B × 12 B / 32 = 2.7 GB, fp32 frozen reference
7.1B × 4 B / 32 = 0.9 GB, activations of 2 pairs × 2048 tokens with full remat a few GB. Pure FSDP over
the 32 chips; tensor parallelism is not needed at this size.
"""

from rdpo_jax.configs import base


def get_config(arg: str = ""):
    args = base.parse_arg(arg, "rdpo_jax/configs/llava15_7b_tpu.py", required=("model", "data"), optional=("eval",))
    c = base.get_config()
    c.objective = "dpo"
    c.model.path = args["model"]
    c.model.param_dtype = "float32"  # fp32 master weights and Adam moments
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.init_from = "model"
    c.total_steps = 2000
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.data.train = args["data"]
    c.data.eval = args.get("eval", "")
    c.data.batch_size = 64  # pairs per step: 2 per chip
    c.data.seq_buckets = (1024, 1536, 2048)  # 576 image tokens + instruction + both answers
    c.data.max_answer_len = 512
    c.data.workers = 8
    c.dpo.loss_type = "rubric"
    c.dpo.beta = 0.1
    c.dpo.reference = "model"
    c.optim.learning_rate = 5e-7
    c.optim.warmup_steps = 100
    c.optim.grad_clip = 1.0
    c.optim.freeze = "vision_tower/.*"
    c.checkpoint.every = 200
    c.log.every = 10
    c.eval.every = 200
    c.distributed.auto = True  # TPU pods: jax.distributed.initialize() finds the coordinator itself
    return c
