"""rDPO of Qwen3-VL-8B-Instruct on one host with 8 GPUs (80 GB each, e.g. H100).

    python -m rdpo_jax.train --config=configs/qwen3vl_8b_gpu.py:model=/ckpt/Qwen3-VL-8B-Instruct,data=/data/pairs \\
        --workdir=/runs/rdpo-qwen3-8b

Images within 512·32·32 pixels each (≤ 2048 patches of 16 px, ≤ 512 image tokens), up to 2 per record,
patch buffers of 1024, 2048 or 4096 patches; the vision tower frozen apart from its mergers (the final one
and the three DeepStack mergers).

Memory per GPU (estimates, not compiled: GPUs have no compile without the device): fp32 policy + Adam
8.77B × 12 B / 8 = 13.2 GB, the fp32 reference copy of the trainable part (8.35B: all but the tower's
0.42B trunk) 4.2 GB, activations of 2 pairs × 3072 tokens per micro-batch with full remat ~15 GB, plus one
vision block's attention scores over a row's 4096-patch buffer (16 heads × 4096² float32, 1 GiB per row).
FSDP over the 8 GPUs; 32 pairs per step as 2 accumulated micro-batches of 16. (XLA:TPU puts the sharded
state of qwen3vl_8b_tpu.py at 4.14 GiB per chip over 32, ≈ 16.6 GiB over 8: see that file.)
"""

from rdpo_jax import defaults


def get_config(arg: str = ""):
    args = defaults.parse_arg(arg, "configs/qwen3vl_8b_gpu.py", required=("model", "data"), optional=("eval",))
    c = defaults.train()
    c.objective = "dpo"
    c.model.path = args["model"]
    c.model.param_dtype = "float32"
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.init_from = "model"
    c.total_steps = 2000
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 8, 1
    c.data.train = args["data"]
    c.data.eval = args.get("eval", "")
    c.data.batch_size = 32
    c.data.seq_buckets = (1024, 2048, 3072)
    c.data.max_answer_len = 512
    c.data.max_images = 2
    c.data.max_pixels = 512 * 32 * 32
    c.data.patch_buckets = (1024, 2048, 4096)
    c.data.workers = 8
    c.accum_steps = 2
    c.dpo.loss_type = "rubric"
    c.dpo.beta = 0.1
    c.optim.learning_rate = 5e-7
    c.optim.warmup_steps = 100
    c.optim.freeze = "visual/(patch_embed|pos_embed|blocks)/.*"
    c.checkpoint.every = 200
    c.eval.every = 200
    return c
