"""rDPO of Qwen3.5-27B (Qwen3-VL's 27-block ViT without DeepStack + a 64-layer hybrid decoder, 16 blocks of
three Gated DeltaNet layers and one gated attention layer, 5120 wide, vocab 248320, untied head; 27.36B
parameters) on a TPU v5p-32 slice: 16 chips on 4 hosts (run on every host: see launch/tpu_vm.sh).

    python -m rdpo_jax.train --config=configs/qwen35_27b_tpu.py:model=/gcs/b/Qwen3.5-27B,data=/gcs/b/pairs \\
        --workdir=/gcs/b/runs/rdpo-qwen35-27b

Images as in configs/qwen3vl_8b_tpu.py (≤ 512 tokens each, 2 per record); the tower is frozen apart from
its merger. Full fine-tuning keeps fp32 weights, two Adam moments and an fp32 reference copy, 16 B a
parameter (438 GB): 25.3 GiB per chip over 16 chips by FSDP.

Compiled for v5p-32 by XLA:TPU (`python -m rdpo_jax.compile --config=THIS:model=FOLDER,data=unused
--topology=v5p-32`, FOLDER holding the model's config.json; 2026-12-07, libtpu 0.0.42.1): the train step at
its longest buckets (32 rows of 3072 tokens, 4096 patches per row) takes 69.5 GiB per chip of 95 (25.3 GiB
of sharded state, 43.8 GiB of temporaries with full remat); XLA's cost model puts it at 9.84 s, 3.3 pairs/s,
29% MFU once the −1 s it gives each triangular solve is added back (an estimate: docs/benchmarks.md,
"Qwen3.5-27B"). Why this slice and 2 pairs per chip: 4 per chip do not fit (84.3 GiB of temporaries), and
on v5p-64 the same 2 per chip take 74.4 GiB of temporaries and 20.7 s for twice the pairs: no faster per
pair on twice the chips.
"""

from rdpo_jax import defaults


def get_config(arg: str = ""):
    args = defaults.parse_arg(arg, "configs/qwen35_27b_tpu.py", required=("model", "data"), optional=("eval",))
    c = defaults.train()
    c.objective = "dpo"
    c.model.path = args["model"]
    c.model.param_dtype = "float32"  # fp32 master weights and Adam moments
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.init_from = "model"
    c.total_steps = 4000  # 128k pairs
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.data.train = args["data"]
    c.data.eval = args.get("eval", "")
    c.data.batch_size = 32  # pairs per step: 2 per chip (4 do not fit: the module docstring)
    c.data.seq_buckets = (1024, 2048, 3072)  # ≤ 2 × 512 image tokens + instruction + both answers
    c.data.max_answer_len = 512
    c.data.max_images = 2
    c.data.max_pixels = 512 * 32 * 32
    c.data.patch_buckets = (1024, 2048, 4096)  # 2048 patches (512 tokens) per image, 2 images
    c.data.workers = 8
    c.dpo.loss_type = "rubric"
    c.dpo.beta = 0.1
    c.dpo.reference = "model"
    c.optim.learning_rate = 3e-7
    c.optim.warmup_steps = 100
    c.optim.grad_clip = 1.0
    c.optim.freeze = "visual/(patch_embed|pos_embed|blocks)/.*"
    c.checkpoint.every = 200
    c.log.every = 10
    c.eval.every = 200
    c.distributed.auto = True  # TPU pods: jax.distributed.initialize() finds the coordinator itself
    return c
