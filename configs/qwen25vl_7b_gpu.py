"""rDPO of Qwen2.5-VL-7B-Instruct on one host with 8 GPUs (80 GB each, e.g. H100).

    python -m rdpo_jax.train --config=configs/qwen25vl_7b_gpu.py:model=/ckpt/Qwen2.5-VL-7B-Instruct,data=/data/pairs \\
        --workdir=/runs/rdpo-qwen7b

Images within 512·28·28 pixels each (≤ 512 image tokens), up to 2 per record, patch buffers of 1024, 2048
or 4096 patches; the vision tower frozen apart from its patch merger.

Memory per GPU: fp32 policy + Adam 8.3B × 12 B / 8 = 12.5 GB, the fp32 reference copy of the trainable
part 3.8 GB, activations of 2 pairs × 3072 tokens per micro-batch with full remat ~15 GB, plus one vision
block's dense window scores (1 GB per row). FSDP over the 8 GPUs; 32 pairs per step as 2 accumulated
micro-batches of 16. (The 32-device CPU compile of qwen25vl_7b_tpu.py puts the sharded state at 3.67 GiB
per device, ≈ 14.7 GiB over 8; XLA:CPU's temporaries are not a GPU's: see that file.)
"""

from rdpo_jax import defaults


def get_config(arg: str = ""):
    args = defaults.parse_arg(arg, "configs/qwen25vl_7b_gpu.py", required=("model", "data"), optional=("eval",))
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
    c.data.max_pixels = 512 * 28 * 28
    c.data.patch_buckets = (1024, 2048, 4096)
    c.data.workers = 8
    c.accum_steps = 2
    c.dpo.loss_type = "rubric"
    c.dpo.beta = 0.1
    c.optim.learning_rate = 5e-7
    c.optim.warmup_steps = 100
    c.optim.freeze = "visual/(patch_embed|blocks)/.*"
    c.checkpoint.every = 200
    c.eval.every = 200
    return c
