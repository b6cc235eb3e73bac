"""rDPO of Qwen3-VL-8B-Instruct (a 27-block ViT, 1152 wide, with learned positions and DeepStack into the first
3 decoder layers, + a 36-layer Qwen3 8B with interleaved M-RoPE, untied head; 8.77B parameters) on a TPU v5p-64
slice: 32 chips on 8 hosts (run on every host: see launch/tpu_vm.sh).

    python -m rdpo_jax.train --config=configs/qwen3vl_8b_tpu.py:model=/gcs/b/Qwen3-VL-8B-Instruct,data=/gcs/b/pairs \\
        --workdir=/gcs/b/runs/rdpo-qwen3-8b

Images: any size, each resized within a budget of 512·32·32 pixels (one merged token is 32×32 px at patch
16: ≤ 2048 patches, ≤ 512 image tokens); up to 2 images per record, packed per row into patch buffers of
1024, 2048 or 4096 patches. The vision tower is frozen apart from its mergers (the final one and the
three DeepStack mergers, the projectors into the decoder).

Compiled for v5p-64 by XLA:TPU (`python -m rdpo_jax.compile --config=THIS:model=FOLDER,data=unused
--topology=v5p-64`, FOLDER holding the model's config.json; 2026-12-07, libtpu 0.0.42.1): the train step
at its longest buckets (256 rows of 3072 tokens, 4096 patches per row) takes 25.6 GiB per chip of 95
(4.1 GiB of sharded state, 21.3 GiB of temporaries with full remat). XLA's cost model puts the step at
10.84 s, 23.6 pairs/s, 35% MFU (an estimate, not a measurement: docs/benchmarks.md, "Qwen3-VL-8B on
v5p-64"). 8 pairs per chip as for Qwen2.5-VL-7B, with 69 GiB to spare.
"""

from rdpo_jax import defaults


def get_config(arg: str = ""):
    args = defaults.parse_arg(arg, "configs/qwen3vl_8b_tpu.py", required=("model", "data"), optional=("eval",))
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
    c.data.max_pixels = 512 * 32 * 32
    c.data.patch_buckets = (1024, 2048, 4096)  # 2048 patches (512 tokens) per image, 2 images
    c.data.workers = 8
    c.dpo.loss_type = "rubric"
    c.dpo.beta = 0.1
    c.dpo.reference = "model"
    c.optim.learning_rate = 5e-7
    c.optim.warmup_steps = 25
    c.optim.grad_clip = 1.0
    c.optim.freeze = "visual/(patch_embed|pos_embed|blocks)/.*"
    c.checkpoint.every = 50
    c.log.every = 10
    c.eval.every = 50
    c.distributed.auto = True  # TPU pods: jax.distributed.initialize() finds the coordinator itself
    return c
