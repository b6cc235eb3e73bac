"""rDPO of Qwen3-VL-30B-A3B-Instruct (Qwen3-VL-8B's 27-block ViT with DeepStack, 2048 wide out, + a 48-layer
Qwen3-MoE decoder, 2048 wide, 128 experts of 768 with 8 per token, untied head; 31.1B parameters, 3.3B a token
runs through) on a TPU v5p-64 slice: 32 chips on 8 hosts (run on every host: see launch/tpu_vm.sh).

    python -m rdpo_jax.train --config=configs/qwen3vl_30b_a3b_tpu.py:model=/gcs/b/Qwen3-VL-30B-A3B-Instruct,data=/gcs/b/pairs \\
        --workdir=/gcs/b/runs/rdpo-qwen3-30b-a3b

Images as configs/qwen3vl_8b_tpu.py: each within 512·32·32 pixels (≤ 2048 patches of 16 px, ≤ 512 image
tokens), up to 2 per record, patch buffers of 1024, 2048 or 4096 per row; the tower frozen apart from its
four mergers. The mesh is fsdp 16 × expert 2: batch rows over all 32 chips; each chip holds 64 of the 128
experts, their width over fsdp (1/32 of the experts' weights), and a sixteenth of every other weight.

Compiled for v5p-64 by XLA:TPU (`python -m rdpo_jax.compile --config=THIS:model=FOLDER,data=unused
--topology=v5p-64`; 2026-12-07, libtpu 0.0.42.1, rdpo_jax at c23d54f) at its longest buckets (256 rows of
3072 tokens, 4096 patches per row) — with moe._expert_parallel's shard_map at check_vma=False and the
MoE's scalar scatters gone, as the code has them since (docs/benchmarks.md, "Qwen3-VL-30B-A3B on v5p-64"): 45.9
GiB per chip of 95 (15.3 GiB of sharded state, 30.4 GiB of temporaries with full remat). XLA's cost
model gives the step a negative time: it prices scatter-adds of scalars at −2 s each (the MoE's group
sizes and router counts, each megablox call's group metadata, the router's top-k gradient). With each
one's 2 s added back it puts the step at 15.8 s, 16.2 pairs/s, 18% MFU (11.4 s, 22.4 pairs/s with the
grouped matmuls charged their real rows, not the dropless buffer's): an estimate, not a measurement, no
faster per pair than the dense 8B (configs/qwen3vl_8b_tpu.py). The all-to-alls move 576 GiB per chip per
step (the dropless reservation: each chip sends 2 × its 196608 token assignments, 1.5 GiB, 8 times a
layer); fsdp 8 × expert 4 takes 54.3 GiB and moves 1152 GiB.
"""

from rdpo_jax import defaults


def get_config(arg: str = ""):
    args = defaults.parse_arg(arg, "configs/qwen3vl_30b_a3b_tpu.py", required=("model", "data"), optional=("eval",))
    c = defaults.train()
    c.objective = "dpo"
    c.model.path = args["model"]
    c.model.param_dtype = "float32"  # fp32 master weights and Adam moments
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.init_from = "model"
    c.total_steps = 500  # 128k pairs
    c.mesh.data, c.mesh.fsdp, c.mesh.expert, c.mesh.tensor = 1, 16, 2, 1  # expert 2: half the all-to-all bytes of 4
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
