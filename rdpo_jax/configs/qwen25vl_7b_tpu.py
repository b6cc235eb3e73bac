"""rDPO of Qwen2.5-VL-7B-Instruct (a 32-block window-attention ViT, 1280 wide, + a 28-layer Qwen2 7B with
M-RoPE, untied head; 8.3B parameters) on a TPU v5p-64 slice: 32 chips on 8 hosts (run on every host: see
launch/tpu_vm.sh).

    python -m rdpo_jax.train --config=rdpo_jax/configs/qwen25vl_7b_tpu.py:model=/gcs/b/Qwen2.5-VL-7B-Instruct,data=/gcs/b/pairs \\
        --workdir=/gcs/b/runs/rdpo-qwen7b

Images: any size, each resized within a budget of 512·28·28 pixels (≤ 2048 patches, ≤ 512 image tokens;
the processor's own default is 1280·28·28); up to 2 images per record, packed per row into patch buffers
of 1024, 2048 or 4096 patches. The vision tower is frozen apart from its patch merger (the projector).

Memory per chip (95 GB HBM): fp32 policy + Adam ≈ 8.3B × 12 B / 32 = 3.1 GB, the fp32 reference copy of
the trainable part (7.6B × 4 B / 32) 0.95 GB; activations of 2 pairs × 3072 tokens with full remat a few
GB, plus the vision tower's dense window masks: [4096, 4096] float32 scores × 16 heads = 1 GB per row
for the one block alive under remat (a block-sparse window layout is issue 17's fused attention).
`python benchmarks/dpo_step.py --preset=qwen2.5-vl-7b` gives the FLOPs per pair of each layout.

Measured without a TPU (`XLA_FLAGS=--xla_force_host_platform_device_count=32 python benchmarks/dpo_step.py
--preset=qwen2.5-vl-7b --memory --pairs=64 --freeze_vision`: this step compiled for 32 CPU devices, 2.7 min):
arguments 3.67 GiB per device — the sharded state, as planned above. XLA:CPU reports 96.8 GiB of
temporaries, but that figure does not shrink with the device count (LLaVA-1.5-7B by the same method: 85.5
GiB on 8 devices, 81.9 GiB on 32): the CPU scheduler keeps whole gathered weights and gradients alive,
which TPU's does not. The activation figures above are estimates until compiled for the TPU itself.
"""

from rdpo_jax.configs import base


def get_config(arg: str = ""):
    args = base.parse_arg(arg, "rdpo_jax/configs/qwen25vl_7b_tpu.py", required=("model", "data"), optional=("eval",))
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
    c.optim.warmup_steps = 100
    c.optim.grad_clip = 1.0
    c.optim.freeze = "visual/(patch_embed|blocks)/.*"
    c.checkpoint.every = 200
    c.log.every = 10
    c.eval.every = 200
    c.distributed.auto = True  # TPU pods: jax.distributed.initialize() finds the coordinator itself
    return c
