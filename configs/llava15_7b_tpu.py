"""rDPO of a LLaVA-1.5-7B-class model (CLIP ViT-L/336 + Llama-2-7B, 576 image tokens) on a TPU v5p-64
slice: 32 chips on 8 hosts (run on every host: see launch/tpu_vm.sh).

    python -m rdpo_jax.train --config=configs/llava15_7b_tpu.py:model=/gcs/b/llava-1.5-7b-hf,data=/gcs/b/pairs \\
        --workdir=/gcs/b/runs/rdpo-7b

(/gcs/b: a Cloud Storage bucket mounted with gcsfuse at the same path on every host.)

Compiled for v5p-64 by XLA:TPU (`python -m rdpo_jax.compile --config=THIS:model=FOLDER,data=unused
--topology=v5p-64`, FOLDER holding the model's config.json; 2026-12-07, libtpu 0.0.42.1): the train step
at its longest bucket (256 rows of 2048 tokens) takes 16.0 GiB per chip of 95 (3.2 GiB of sharded state:
fp32 policy + Adam + the fp32 reference of the trainable part; 12.7 GiB of temporaries with full remat).
XLA's cost model puts the step at 5.8 s, 44 pairs/s (an estimate, not a measurement); 8 pairs per chip
were chosen over 2 (8.1 GiB, 30 pairs/s): more rows per weight all-gather. Less remat costs XLA's model
more than it saves (dots_saveable: 53 GiB, 34 pairs/s); a precomputed reference gives 62 pairs/s and
groups data in multi_answer rows (4 answers, 4 pairs) 95 (docs/benchmarks.md, "Compiled for v5p-64").
"""

from rdpo_jax import defaults


def get_config(arg: str = ""):
    args = defaults.parse_arg(arg, "configs/llava15_7b_tpu.py", required=("model", "data"), optional=("eval",))
    c = defaults.train()
    c.objective = "dpo"
    c.model.path = args["model"]
    c.model.param_dtype = "float32"  # fp32 master weights and Adam moments
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.init_from = "model"
    c.total_steps = 500  # 128k pairs
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.data.train = args["data"]
    c.data.eval = args.get("eval", "")
    c.data.batch_size = 256  # pairs per step: 8 per chip
    c.data.seq_buckets = (1024, 1536, 2048)  # 576 image tokens + instruction + both answers
    c.data.max_answer_len = 512
    c.data.workers = 8
    c.dpo.loss_type = "rubric"
    c.dpo.beta = 0.1
    c.dpo.reference = "model"
    c.optim.learning_rate = 5e-7
    c.optim.warmup_steps = 25
    c.optim.grad_clip = 1.0
    c.optim.freeze = "vision_tower/.*"
    c.checkpoint.every = 50
    c.log.every = 10
    c.eval.every = 50
    c.distributed.auto = True  # TPU pods: jax.distributed.initialize() finds the coordinator itself
    return c
