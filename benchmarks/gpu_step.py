"""One GPU's DPO step: a ~1B LLaVA, bfloat16 compute, cuDNN or XLA attention, timed with its model FLOP utilization.

    python benchmarks/gpu_step.py [--pairs=8] [--steps=10] [--layers=16] [--width=2048] [--attention=cudnn]
        [--loss=rubric|sigmoid] [--dtype=bfloat16|float32]
    python benchmarks/gpu_step.py --width=128 --layers=2 --pairs=2 --steps=2 --attention=xla   # CPU check

Model: a LLaVA with a small SigLIP tower (336 px / patch 14: 576 image tokens; width 256, 4 layers, MLP
1024) and a Llama decoder shaped like TinyLlama's (--width 2048, --layers 16, MLP 2.75×, heads of 64, 8
query heads per KV head, vocab 32000, untied head): 0.845B parameters at the defaults, all trained.
Parameters and optimizer state are fp32; activations and matmuls run in --dtype (RunSettings.dtype).
Data: --pairs pairs per step, each a 576-token image + 64-token prompt with 128-token chosen and rejected
answers in one shared-prefix row (896 tokens); DPO with an online reference (a second forward of the
reference copy), --loss over 4 random rubric criteria per pair. Decoder layers unrolled (scan_layers=off).

The step is compiled ahead of time (its memory analysis printed), run 3 times to warm up, then --steps
times, each to `block_until_ready`; the median is reported with pairs/s and model FLOP utilization (MFU):
the matmul FLOPs that the model needs (`model_flops`: policy forward + backward = 3 forwards, plus the
reference forward; attention counted over the keys each query sees) per second, against the GPU's bf16
dense peak from its datasheet (`PEAKS`), or, for an unknown device, `peak.matmul_peak`'s measured fp32 rate.
XLA's own count of the lowered program is printed beside it as a check. It counts a loop's body once, so
of the LM head, which runs over the vocabulary in `RunSettings.vocab_chunk` columns at a time, it counts one
chunk of two (a 32000 vocabulary), and it leaves out custom calls (the cuDNN attention kernel); elsewhere it
counts the elementwise work too, which `model_flops` leaves out.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import transformers
from absl import app, flags

from rdpo_jax import logps, optim, packing, sharding, train_step
from rdpo_jax.batch import Batch
from rdpo_jax.models import config as config_lib
from rdpo_jax.models import families
from peak import matmul_peak  # benchmarks/peak.py

_PAIRS = flags.DEFINE_integer("pairs", 8, "Pairs per step.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (median reported).")
_LAYERS = flags.DEFINE_integer("layers", 16, "Decoder layers.")
_WIDTH = flags.DEFINE_integer("width", 2048, "Decoder width (a multiple of 64: heads of 64).")
_ATTENTION = flags.DEFINE_enum("attention", "cudnn", ["cudnn", "xla", "jax"],
                               "RunSettings.attention: cuDNN flash attention (GPU, half precision), XLA's einsums, "
                               "or jax.nn.dot_product_attention on XLA (the cudnn call's path, on any backend).")
_LOSS = flags.DEFINE_enum("loss", "rubric", ["rubric", "sigmoid"], "DPO loss type.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype (parameters stay fp32).")

IMAGE, PROMPT, ANSWER, CRITERIA = 576, 64, 128, 4
WARMUP = 3
# bf16 dense tensor-core peaks from NVIDIA's datasheets, FLOP/s; matched in order against the device kind
PEAKS = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("A100", 312e12))


def model_config():
    """(architecture, run settings) of the benchmark model."""
    width = _WIDTH.value
    heads = width // 64
    hf = transformers.LlavaConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=256, intermediate_size=1024,
                           num_hidden_layers=4, num_attention_heads=4, image_size=336, patch_size=14),
        text_config=dict(model_type="llama", vocab_size=32000, hidden_size=width, intermediate_size=int(2.75 * width),
                         num_hidden_layers=_LAYERS.value, num_attention_heads=heads,
                         num_key_value_heads=max(1, heads // 8), max_position_embeddings=4096),
        image_token_index=31999, vision_feature_layer=-1, vision_feature_select_strategy="full")
    run = config_lib.RunSettings(param_dtype=jnp.float32, dtype=config_lib.DTYPES[_DTYPE.value],
                                 attention=_ATTENTION.value, scan_layers="off", check_image_tokens=False)
    return families.from_hf(hf), run


def make_batch(cfg, n: int, rng) -> Batch:
    """n shared-prefix pairs with one image each, random pixels, tokens and rubric scores."""
    assert cfg.image_seq_len == IMAGE
    pairs = [([1] + [cfg.image_token_id] * IMAGE + list(rng.integers(2, 8000, PROMPT - 1)),
              [list(rng.integers(2, 8000, ANSWER)), list(rng.integers(2, 8000, ANSWER))]) for _ in range(n)]
    pixels = rng.standard_normal((n, 336, 336, 3)).astype(np.float32)
    ones = np.ones((n, 1, CRITERIA), np.float32)
    rubric = dict(chosen_scores=rng.uniform(size=(n, 1, CRITERIA)).astype(np.float32),
                  rejected_scores=rng.uniform(size=(n, 1, CRITERIA)).astype(np.float32),
                  criterion_weights=ones, criterion_mask=ones, essential_mask=(ones * [1, 1, 0, 0]).astype(np.float32))
    groups = [packing.Group(prompt, answers, fields={k: v[i] for k, v in rubric.items()})
              for i, (prompt, answers) in enumerate(pairs)]
    batch, _ = packing.pack(groups, layout="shared_prefix", seq_len=IMAGE + PROMPT + 2 * ANSWER, max_answer_len=ANSWER,
                            images={"pixel_values": pixels})
    return batch


def model_flops(cfg, batch) -> float:
    """Matmul FLOPs of one step: (policy forward + backward = 3 forwards) + reference forward = 4 forwards.

    A forward: the SigLIP tower (patch embedding, its layers with full attention over the image's patches),
    the projector, the decoder over every real token (projections and MLP; attention's two products over
    the keys each query may see under the shared-prefix mask) and the LM head over the answer tokens only."""
    v, t = cfg.vision, cfg.text
    images, n = len(batch.valid), v.num_patches
    vision = images * (2 * n * 3 * v.patch_size ** 2 * v.hidden_size + v.num_layers * (
        2 * n * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size) + 4 * n * n * v.hidden_size))
    projector = images * n * 2 * (cfg.projector_in * t.hidden_size + t.hidden_size ** 2)
    q, kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    tokens = int((batch.branch_ids >= 0).sum())
    visible = int(np.asarray(logps.attention_mask(jnp.asarray(batch.branch_ids))).sum())
    layer = 2 * tokens * (t.hidden_size * (2 * q + 2 * kv) + 3 * t.hidden_size * t.intermediate_size) + 4 * q * visible
    head = 2 * int((batch.target_branch > 0).sum()) * t.hidden_size * t.vocab_size
    return 4 * (vision + projector + t.num_layers * layer + head)


def peak_flops() -> tuple[float, str]:
    """(FLOP/s, where it comes from) for the first device."""
    kind = jax.devices()[0].device_kind
    for name, peak in PEAKS:
        if name in kind:
            return peak, f"{kind} bf16 dense datasheet peak"
    print(f"peak unknown for {kind!r}: measuring peak.matmul_peak (fp32 matmul)")
    return matmul_peak(), f"{kind} measured fp32 matmul peak"


def main(argv):
    del argv
    cfg, run = model_config()
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    B = _PAIRS.value
    batch = make_batch(cfg, B, np.random.default_rng(0))
    params = optim.split_params(families.abstract_model(cfg, run))[1]
    n_params = sum(x.size for x in jax.tree.leaves(params))
    n_decoder = sum(x.size for x in jax.tree.leaves(params["language_model"]))
    t = cfg.text
    print(f"devices: {jax.device_count()} × {jax.devices()[0].device_kind} (jax {jax.__version__}); model "
          f"{n_params / 1e9:.3f}B params (decoder {t.num_layers}×{t.hidden_size}, MLP {t.intermediate_size}, "
          f"{t.num_heads}/{t.num_kv_heads} heads, vocab {t.vocab_size}: {n_decoder / 1e9:.3f}B; SigLIP "
          f"{cfg.vision.num_layers}×{cfg.vision.hidden_size}); fp32 parameters, {_DTYPE.value} compute, attention "
          f"{run.attention}, loss {_LOSS.value}, online reference; {B} pairs/step, shared-prefix rows of "
          f"{IMAGE}+{PROMPT}+{ANSWER}+{ANSWER} tokens")

    optimizer = optim.make_optimizer(learning_rate=1e-5, weight_decay=0.0)
    t0 = time.perf_counter()
    graphdef, state = train_step.init_state(families.create(cfg, run, mesh=mesh, seed=0), optimizer, reference=True)
    device_batch = jax.device_put(batch, batch.shardings(mesh))
    fn = train_step.make_dpo_step(graphdef, optimizer, optax.constant_schedule(1e-5),
                                  train_step.DPOSettings(loss_type=_LOSS.value, beta=0.1)).train
    t1 = time.perf_counter()
    lowered = train_step.jit_step(fn, state, device_batch, mesh).lower(state, device_batch)
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    m = compiled.memory_analysis()
    gib = 2 ** 30
    print(f"init {t1 - t0:.1f}s, trace+lower {t2 - t1:.1f}s, compile {t3 - t2:.1f}s; memory: arguments "
          f"{m.argument_size_in_bytes / gib:.2f} GiB, outputs {m.output_size_in_bytes / gib:.2f} GiB (aliased "
          f"{m.alias_size_in_bytes / gib:.2f}), temporaries {m.temp_size_in_bytes / gib:.2f} GiB")

    losses = []
    for _ in range(WARMUP):
        state, metrics = compiled(state, device_batch)
        losses.append(float(metrics["loss"]))
    times = []
    for _ in range(_STEPS.value):
        t0 = time.perf_counter()
        state, metrics = compiled(state, device_batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all(), f"non-finite loss: {losses}"
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        print(f"device memory: peak {stats['peak_bytes_in_use'] / gib:.2f} GiB of "
              f"{stats.get('bytes_limit', 0) / gib:.2f} GiB")

    flops = model_flops(cfg, batch)
    peak, source = peak_flops()
    median = statistics.median(times)
    print(f"losses: warm-up {losses[0]:.4f} → last {losses[-1]:.4f}; model FLOPs per step {flops / 1e12:.3g} T "
          f"({flops / B / 1e12:.3g} T/pair)")
    print(f"step: median {median * 1e3:.1f} ms over {len(times)} steps (min {min(times) * 1e3:.1f}, max "
          f"{max(times) * 1e3:.1f}); {B / median:.2f} pairs/s; {flops / median / 1e12:.3g} TFLOP/s = "
          f"MFU {flops / median / peak:.1%} of {peak / 1e12:.3g} TFLOP/s ({source})")
    xla_flops = lowered.cost_analysis()["flops"]
    print(f"XLA's count of the lowered step: {xla_flops / 1e12:.3g} T = {xla_flops / flops:.2f}× the model FLOPs "
          f"(one LM-head chunk, no custom calls, elementwise work)")

if __name__ == "__main__":
    app.run(main)
