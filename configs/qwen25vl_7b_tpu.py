"""rDPO of Qwen2.5-VL-7B-Instruct (a 32-block window-attention ViT, 1280 wide, + a 28-layer Qwen2 7B with
M-RoPE, untied head; 8.3B parameters) on a TPU v5p-64 slice: 32 chips on 8 hosts (run on every host: see
launch/tpu_vm.sh).

    python -m rdpo_jax.train --config=configs/qwen25vl_7b_tpu.py:model=/gcs/b/Qwen2.5-VL-7B-Instruct,data=/gcs/b/pairs \\
        --workdir=/gcs/b/runs/rdpo-qwen7b

Images: any size, each resized within a budget of 512·28·28 pixels (≤ 2048 patches, ≤ 512 image tokens;
the processor's own default is 1280·28·28); up to 2 images per record, packed per row into patch buffers
of 1024, 2048 or 4096 patches. The vision tower is frozen apart from its patch merger (the projector).

Compiled for v5p-64 by XLA:TPU (`python -m rdpo_jax.compile --config=THIS:model=FOLDER,data=unused
--topology=v5p-64`, FOLDER holding the model's config.json; 2026-12-07, libtpu 0.0.42.1): the train step
at its longest buckets (256 rows of 3072 tokens, 4096 patches per row) takes 22.6 GiB per chip of 95
(3.8 GiB of sharded state, 18.8 GiB of temporaries with full remat). XLA's cost model puts the step at
8.7 s, 29 pairs/s (an estimate, not a measurement); 8 pairs per chip were chosen over 2 (9.8 GiB, 21
pairs/s). Variants and layouts: docs/benchmarks.md, "Compiled for v5p-64".
"""

from rdpo_jax import defaults


def get_config(arg: str = ""):
    args = defaults.parse_arg(arg, "configs/qwen25vl_7b_tpu.py", required=("model", "data"), optional=("eval",))
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
    c.data.seq_buckets = (1024, 2048, 3072)  # ≤ 2 × 512 image tokens + instruction + both answers
    c.data.max_answer_len = 512
    c.data.max_images = 2
    c.data.max_pixels = 512 * 28 * 28
    c.data.patch_buckets = (1024, 2048, 4096)
    c.data.workers = 8
    c.dpo.loss_type = "rubric"
    c.dpo.beta = 0.1
    c.dpo.reference = "model"
    c.optim.learning_rate = 5e-7
    c.optim.warmup_steps = 25
    c.optim.grad_clip = 1.0
    c.optim.freeze = "visual/(patch_embed|blocks)/.*"
    c.checkpoint.every = 50
    c.log.every = 10
    c.eval.every = 50
    c.distributed.auto = True  # TPU pods: jax.distributed.initialize() finds the coordinator itself
    return c
