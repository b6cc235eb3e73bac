"""rDPO of Qwen3-VL-30B-A3B-Instruct on one host with 8 GPUs (80 GB each, e.g. H100), with a precomputed
reference: full fine-tuning with the reference model online does not fit 8 × 80 GB.

    python -m data_prep.ref_logps --config=configs/qwen3vl_30b_a3b_gpu.py:model=/ckpt/Qwen3-VL-30B-A3B-Instruct,data=/data/pairs \\
        --pairs=/data/pairs --out=/data
    python -m rdpo_jax.train --config=configs/qwen3vl_30b_a3b_gpu.py:model=/ckpt/Qwen3-VL-30B-A3B-Instruct,data=/data/pairs_ref \\
        --workdir=/runs/rdpo-qwen3-30b-a3b

Images as configs/qwen3vl_8b_gpu.py (≤ 512 image tokens each, up to 2 per record, patch buffers of 1024,
2048 or 4096); the vision tower frozen apart from its mergers.

Memory per GPU (estimates, not compiled: GPUs have no compile without the device). 31.07B parameters, of
which 28.99B in the routed experts. fp32 master weights + Adam moments are 12 B a parameter, 373 GB, and
the fp32 gradients 4 B more while the update runs: 497 GB in all, 62 GB per GPU over 8 before any
activation. The mesh is fsdp 4 × expert 2 (each GPU holds 64 of the 128 experts, their width over fsdp,
and a quarter of every other weight; tokens reach their experts by all-to-all): experts 28.99B × 16 B / 8
= 58.0 GB, the rest 2.08B × 16 B / 4 = 8.3 GB, 66.3 GB. An online reference would add its fp32 copy of
the trained part (4 B a parameter: +16.6 GB) — 83 GB before activations, over the 80. With the reference's
log-likelihoods precomputed (`data_prep.ref_logps`, one forward of the frozen model over the data) what
is left is ~13 GB for the activations of 1 pair × 3072 tokens per GPU with full remat, the per-layer
all-gathered weights and the all-to-all buffers, and one vision block's attention scores over a row's
4096 patches (16 heads × 4096² float32, 1 GiB): it may fit, tightly (set XLA_PYTHON_CLIENT_MEM_FRACTION=.95);
measure with benchmarks/gpu_check.sh before a long run. Comfortable: 16 GPUs (two such hosts) halve the
state. 32 pairs per step as 4 accumulated micro-batches of 8 (1 pair per GPU).
"""

from rdpo_jax import defaults


def get_config(arg: str = ""):
    args = defaults.parse_arg(arg, "configs/qwen3vl_30b_a3b_gpu.py", required=("model", "data"), optional=("eval",))
    c = defaults.train()
    c.objective = "dpo"
    c.model.path = args["model"]
    c.model.param_dtype = "float32"
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.init_from = "model"
    c.total_steps = 2000
    c.mesh.data, c.mesh.fsdp, c.mesh.expert, c.mesh.tensor = 1, 4, 2, 1
    c.data.train = args["data"]
    c.data.eval = args.get("eval", "")
    c.data.batch_size = 32
    c.data.seq_buckets = (1024, 2048, 3072)
    c.data.max_answer_len = 512
    c.data.max_images = 2
    c.data.max_pixels = 512 * 32 * 32
    c.data.patch_buckets = (1024, 2048, 4096)
    c.data.workers = 8
    c.accum_steps = 4
    c.dpo.loss_type = "rubric"
    c.dpo.beta = 0.1
    c.dpo.reference = "precomputed"  # the online reference's fp32 copy does not fit (see above)
    c.optim.learning_rate = 5e-7
    c.optim.warmup_steps = 100
    c.optim.freeze = "visual/(patch_embed|pos_embed|blocks)/.*"
    c.checkpoint.every = 200
    c.eval.every = 200
    return c
