"""DPO step throughput: shared-prefix vs concat layout, online vs precomputed reference.

    python benchmarks/dpo_step.py [--family=llava|qwen2_5_vl] [--pairs=4] [--steps=7] [--width=256] [--layers=4]
        [--freeze_vision] [--query_block=128] [--scan_layers=off|on]
    python benchmarks/dpo_step.py --compile_only --layers=32 --scan_layers=on   # compile time against depth
    python benchmarks/dpo_step.py --preset=llava-1.5-7b    # FLOPs only: lowered, never compiled or run
    python benchmarks/dpo_step.py --preset=qwen2.5-vl-7b   # the same for Qwen2.5-VL-7B (qwen3-vl-8b, qwen3-vl-30b-a3b)
    python benchmarks/dpo_step.py --preset=llava-1.5-7b --topology=v5p-64 --pairs=96   # XLA:TPU's estimates

Model: a LLaVA with a SigLIP tower at 336 px / patch 14 (576 image tokens; width 128, 2 layers), or a
Qwen2.5-VL with its window-attention tower (width 128, 2 blocks, one of them full attention) on a 672×672
image (48×48 patches, 576 image tokens); either with a Qwen2 decoder (width --width, --layers layers, 4
heads / 2 KV heads, MLP 2.75×, vocab 8192; M-RoPE for Qwen2.5-VL), fp32.
Data: a 576-token image + 64-token instruction prompt, 128-token chosen and rejected answers.
All variants run in one process on the same parameters and batch: compiled ahead of time (the memory
analysis is printed), 2 warm-up steps each, then --steps rounds that time one step of every variant in
turn (batch already on device); each variant's median is reported. The reference log-likelihoods for
"precomputed" come from the same model, so every variant computes the same loss; the script checks that.
Each variant's floating-point operations per pair, as XLA counts them in the compiled step
(`cost_analysis`), are printed beside its time, with the FLOP ratios beside the time ratios.

`--preset=llava-1.5-7b` counts the same five steps for LLaVA-1.5-7B's shapes (CLIP ViT-L/14 at 336 px,
576 image tokens; Llama 7B, 32 × 4096, vocab 32064; bfloat16), `--preset=qwen2.5-vl-7b` for
Qwen2.5-VL-7B's (the 32-block ViT at 672×672 px: 2304 patches, 576 image tokens; Qwen2 7B, 28 × 3584,
vocab 152064; bfloat16), `--preset=qwen3-vl-8b` for Qwen3-VL-8B's (the 27-block ViT with DeepStack at
768×768 px: 2304 patches of 16 px, 576 image tokens; Qwen3 8B, 36 × 4096, vocab 151936; bfloat16),
`--preset=qwen3-vl-30b-a3b` for Qwen3-VL-30B-A3B's (that tower into a 48-layer MoE decoder, 2048 wide, 8 of
128 experts per token) — any preset of `presets.py`, through its family's own image adapter — without
memory: the state is abstract and each step is only lowered, so the count is XLA's for the unoptimized
program, printed beside the matmul FLOPs from the jaxpr (`analysis.matmul_flops`), which count a MoE's
grouped matmuls as the rows' work where XLA counts every expert's (`preset_flops`). It is the ceiling on the
time ratios for a compute-bound accelerator at that scale. With `--topology=SLICE` every variant (and
multi-answer groups) is compiled by XLA:TPU for that slice as the 7B configs train — FSDP over every chip,
fp32 master weights, bf16 compute, full remat (`rdpo_jax.compile`) — and XLA's cost-model time per pair
(an estimate, not a measurement) is printed with its ratio to TRL's step; --pairs must split into the chips
(96 on 32: concat rows 192, groups 32). Every run prints the model's parameters, in total and those a
token runs through (equal for a dense model; a mixture of experts' routed share is less).

Both layouts send only answer positions through the LM head, and both encode a pair's images once (the
concat layout reuses the features for its two rows). A fifth variant times the concat layout the way
TRL's `concatenated_forward` computes it with its default `use_logits_to_keep=False`: each row encodes its
own copy of the images, logits at every position, then the answer tokens picked — the anchor's own cost,
reported apart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import statistics
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
import transformers
from absl import app, flags
from flax import nnx
from PIL import Image

from rdpo_jax import logps, optim, packing, sharding, train_step
from rdpo_jax.compile import analysis
from rdpo_jax.models import config as config_lib
from rdpo_jax.models import families, image_inputs, layers
import presets  # benchmarks/presets.py
from peak import matmul_peak  # benchmarks/peak.py

_PAIRS = flags.DEFINE_integer("pairs", 4, "Pairs per step.")
_STEPS = flags.DEFINE_integer("steps", 7, "Timed steps per variant (median reported).")
_WIDTH = flags.DEFINE_integer("width", 256, "Decoder width.")
_LAYERS = flags.DEFINE_integer("layers", 4, "Decoder layers.")
_FREEZE_VISION = flags.DEFINE_bool("freeze_vision", False, "Freeze the vision tower (no backward through it).")
_TOPOLOGY = flags.DEFINE_string("topology", None, "With --preset: compile every variant for this TPU slice (e.g. "
                                "v5p-64; libtpu on this host) as the 7B configs train (FSDP over every chip, fp32 "
                                "master weights, bf16 compute, full remat) and print XLA's estimated time per pair.")
_PRESET = flags.DEFINE_enum("preset", None, list(presets.NAMES),
                            "Count FLOPs for a real model's shapes instead of timing.")
_FAMILY = flags.DEFINE_enum("family", "llava", ["llava", "qwen2_5_vl"], "The timed small model's family.")
_SCAN = flags.DEFINE_enum("scan_layers", "off", ["off", "on"],
                          "Scan the decoder layers (stacked parameters). XLA counts a scanned loop's body once, so "
                          "the FLOP figures hold for 'off' only.")
_COMPILE_ONLY = flags.DEFINE_bool("compile_only", False, "Only trace, lower and compile the concat step (online "
                                  "reference) on abstract state and print the times: compile time against depth.")
_QUERY_BLOCK = flags.DEFINE_integer("query_block", layers.QUERY_BLOCK,
                                    "Causal attention's query block (layers.QUERY_BLOCK); 0 = one dense product.")

IMAGE, PROMPT, ANSWER = 576, 64, 128
# The vision tower's trunk, in every family (LLaVA's tower; the Qwen-VL towers but their mergers)
FREEZE_VISION = r"(vision_tower|visual/(patch_embed|pos_embed|blocks))/.*"


def model_config():
    """(architecture, run settings) of the benchmark model."""
    if _PRESET.value:
        return families.from_hf(presets.hf_config(_PRESET.value)), config_lib.RunSettings(
            param_dtype=jnp.bfloat16, check_image_tokens=False, scan_layers=_SCAN.value)
    if _FAMILY.value == "qwen2_5_vl":
        w = _WIDTH.value
        hf = transformers.Qwen2_5_VLConfig(
            vision_config=dict(depth=2, hidden_size=128, intermediate_size=512, num_heads=4, fullatt_block_indexes=[1],
                               out_hidden_size=w, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                               window_size=112),
            text_config=dict(vocab_size=8192, hidden_size=w, intermediate_size=int(2.75 * w),
                             num_hidden_layers=_LAYERS.value, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=32768, bos_token_id=None, eos_token_id=None,
                             rope_parameters=dict(rope_type="default", rope_theta=1e6,
                                                  mrope_section=[w // 32, 3 * w // 64, 3 * w // 64])),
            image_token_id=8191, video_token_id=8190, vision_start_token_id=8189, vision_end_token_id=8188,
            tie_word_embeddings=False)
        return families.from_hf(hf), config_lib.RunSettings(check_image_tokens=False, scan_layers=_SCAN.value)
    hf = transformers.LlavaConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=128, intermediate_size=512,
                           num_hidden_layers=2, num_attention_heads=4, image_size=336, patch_size=14),
        text_config=dict(model_type="qwen2", vocab_size=8192, hidden_size=_WIDTH.value,
                         intermediate_size=int(2.75 * _WIDTH.value), num_hidden_layers=_LAYERS.value,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096),
        image_token_index=8191, vision_feature_layer=-1, vision_feature_select_strategy="full")
    return families.from_hf(hf), config_lib.RunSettings(scan_layers=_SCAN.value)


def image_input(cfg, rng):
    """The family's image adapter (its architecture's image shapes) and one image prepared by it that gives
    IMAGE placeholders: for any-resolution families (patch buffers and M-RoPE) a square of √IMAGE merged
    tokens a side (Qwen2.5-VL 672 px, Qwen3-VL 768 px: 2304 patches, 4 a token); fixed-size ones resize."""
    adapter = image_inputs.for_model(cfg, None, max_images=1, patch_buckets=(4 * IMAGE,))
    side = math.isqrt(IMAGE) * adapter.config.factor if adapter.mrope else adapter.config.output_size[0]
    png = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(png, "PNG")
    prepared = adapter.prepare([png.getvalue()])
    assert prepared["tokens"] == [IMAGE], prepared["tokens"]
    return adapter, prepared


def make_pairs(cfg, n, rng, adapter, prepared):
    """n pairs with the IMAGE-token image after BOS (positions: the adapter's, 3D for M-RoPE families)."""
    pairs = []
    for _ in range(n):
        prompt = [1] + [cfg.image_token_id] * IMAGE + list(rng.integers(2, 8000, PROMPT - 1))
        pairs.append(packing.Group(prompt, [list(rng.integers(2, 8000, ANSWER)), list(rng.integers(2, 8000, ANSWER))],
                                   positions=adapter.positions(np.asarray(prompt), prepared)))
    return pairs


def parameter_counts(model) -> tuple[dict[str, int], int]:
    """(parameters per top-level module, those a token runs through). A dense model runs all of them;
    routed experts (parameters with an "expert" logical axis of E experts) count k/E of theirs, k the
    router's top-k (`config.text.moe.top_k`)."""
    per_module, active = {}, 0
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        size = math.prod(variable.get_value().shape)
        per_module[str(path[0])] = per_module.get(str(path[0]), 0) + size
        axes = variable.get_metadata().get("logical_axes") or ()
        if "expert" in axes:
            size = size * model.config.text.moe.top_k // variable.get_value().shape[axes.index("expert")]
        active += size
    return per_module, active


def trl_pair_logps(model, batch, *, layout):
    """`logps.pair_logps` as TRL's `concatenated_forward` computes it: every row encodes its own copy of
    the pair's images (the concat layout's rows share nothing), and the LM head runs at all positions."""
    images = model.images_of(batch.images)
    copies = packing.rows_per_pair(layout)
    features = None if images is None else model.image_features(
        jax.tree.map(lambda x: jnp.repeat(x, copies, axis=0), images))
    token_logps, branch = full_sequence_token_logps(model, batch, features), batch.target_branch

    def per_pair(x):
        return x.reshape(-1, copies).sum(1)

    return {f"{name}_logp": per_pair(jnp.where(branch == b, token_logps, 0.0).sum(-1))
            for name, b in (("chosen", packing.CHOSEN), ("rejected", packing.REJECTED))} | {
        f"{name}_count": per_pair((branch == b).sum(-1).astype(jnp.float32))
        for name, b in (("chosen", packing.CHOSEN), ("rejected", packing.REJECTED))}


def full_sequence_token_logps(model, batch, features):
    """`logps.token_logps` with the LM head and log-softmax at all T positions (TRL's default)."""
    hidden = model.hidden_states(batch.input_ids, features, logps.attention_mask(batch.branch_ids), batch.positions)
    all_logps = jax.nn.log_softmax(model.logits(hidden), axis=-1)  # float32[R, T, V]
    all_logps = jnp.take_along_axis(all_logps, batch.target_index[..., None], axis=1)
    picked = jnp.take_along_axis(all_logps, batch.targets[..., None], axis=-1)[..., 0]
    return jnp.where(batch.target_branch > 0, picked, 0.0)


VARIANTS = [("concat", "model", False), ("concat", "precomputed", False), ("shared_prefix", "model", False),
            ("shared_prefix", "precomputed", False), ("concat", "model", True)]


def variant_name(layout, reference, full_logits):
    return f"{layout:13s} ref={reference:11s}" + (" all-position logits (TRL)" if full_logits else "")


def trace_variant(cfg, run, mesh, pairs, pixels, ref, layout, reference, full_logits, *, abstract):
    """(traced step, state, device batch) of one variant; abstract = shapes only (no memory, no run)."""
    B = len(pairs)
    optimizer = optim.make_optimizer(learning_rate=1e-5, weight_decay=0.0)
    freeze = (FREEZE_VISION,) if _FREEZE_VISION.value else ()
    seq_len = IMAGE + PROMPT + (2 * ANSWER if layout == "shared_prefix" else ANSWER)
    batch, _ = packing.pack(pairs, layout=layout, seq_len=seq_len, max_answer_len=ANSWER,
                            mrope=bool(cfg.text.mrope_section), images=pixels)
    if reference == "precomputed":
        batch = batch.replace(ref_chosen_logp=ref["chosen_logp"].reshape(B, 1),
                              ref_rejected_logp=ref["rejected_logp"].reshape(B, 1))
    shardings = batch.shardings(mesh)
    anchor_forward = mock.patch.object(logps, "pair_logps", trl_pair_logps)
    with anchor_forward if full_logits else contextlib.nullcontext():
        if abstract:
            graphdef, state = train_step.abstract_state(families.abstract_model(cfg, run), optimizer, mesh,
                                                        freeze=freeze, reference=reference == "model")
            batch = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), batch, shardings)
        else:
            graphdef, state = train_step.init_state(families.create(cfg, run, mesh=mesh, seed=0), optimizer, freeze=freeze,
                                                    reference=reference == "model")
            batch = jax.device_put(batch, shardings)
        fn = train_step.make_dpo_step(graphdef, optimizer, optax.constant_schedule(1e-5), train_step.DPOSettings(
            loss_type="sigmoid", beta=0.1, pair_layout=layout, reference=reference)).train
        return train_step.jit_step(fn, state, batch, mesh).trace(state, batch), state, batch


GROUP_PAIRS = ((0, 1), (0, 2), (0, 3))  # an on-policy group: 4 distinct answers, 3 pairs sharing the chosen one


def preset_flops(traced, pairs: int) -> tuple[float, float]:
    """(XLA's FLOPs per pair for the lowered step, its matmul FLOPs per pair from the jaxpr). XLA counts a
    `ragged_dot` (a MoE's grouped matmuls off TPU) forward as a dense product with every group, E× its
    work; `analysis.matmul_flops` counts each row against its own expert only (and every scan body × its
    length)."""
    return traced.lower().cost_analysis()["flops"] / pairs, analysis.matmul_flops(traced.jaxpr)[0] / pairs


def trace_groups(cfg, run, mesh, pairs, pixels, reference):
    """The abstract multi-answer step on the same prompts as on-policy groups (`GROUP_PAIRS`: the prompt of
    every third pair with 4 answers), traced; and its number of pairs."""
    G = len(pairs) // len(GROUP_PAIRS)
    groups = [packing.Group(p.prompt, [*p.answers, p.answers[0][::-1], p.answers[1][::-1]], GROUP_PAIRS, p.positions,
                            {k: np.zeros(len(GROUP_PAIRS), np.float32) for k in ("ref_chosen_logp", "ref_rejected_logp")
                             if reference == "precomputed"}) for p in pairs[:G]]
    batch, _ = packing.pack(groups, layout="multi_answer", seq_len=IMAGE + PROMPT + 4 * ANSWER, max_answer_len=ANSWER,
                            max_answers=4, max_pairs=len(GROUP_PAIRS), mrope=bool(cfg.text.mrope_section),
                            images={k: v[:G] for k, v in pixels.items()})
    optimizer = optim.make_optimizer(learning_rate=1e-5, weight_decay=0.0)
    freeze = (FREEZE_VISION,) if _FREEZE_VISION.value else ()
    graphdef, state = train_step.abstract_state(families.abstract_model(cfg, run), optimizer, mesh, freeze=freeze,
                                                reference=reference == "model")
    batch = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), batch, batch.shardings(mesh))
    fn = train_step.make_dpo_step(graphdef, optimizer, optax.constant_schedule(1e-5), train_step.DPOSettings(
        loss_type="sigmoid", beta=0.1, pair_layout="multi_answer", reference=reference)).train
    return train_step.jit_step(fn, state, batch, mesh).trace(state, batch), G * len(GROUP_PAIRS)


def tpu_plan(cfg, pairs, pixels) -> None:
    """Every variant of the preset compiled by XLA:TPU for `--topology` (`rdpo_jax.compile`): memory per chip
    and XLA's cost-model time per pair (an estimate, not a measurement), against TRL's step."""
    from rdpo_jax.compile import chips, programs, report

    _, chip, devices = chips.devices(_TOPOLOGY.value)
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices=devices)
    run = config_lib.RunSettings(param_dtype=jnp.float32, dtype=jnp.bfloat16, remat="full", check_image_tokens=False)
    B = len(pairs)
    ref = {"chosen_logp": np.zeros(B, np.float32), "rejected_logp": np.zeros(B, np.float32)}
    plain = dataclasses.replace(run, remat="none")  # the model FLOPs: the same step without recomputation

    def trace(settings, v):
        if v[0] == "multi_answer":
            return trace_groups(cfg, settings, mesh, pairs, pixels, v[1])
        return trace_variant(cfg, settings, mesh, pairs, pixels, ref, *v, abstract=True)[0], B

    variants = list(VARIANTS) + [("multi_answer", "model"), ("multi_answer", "precomputed")]
    per_pair = {}
    for v in variants:
        label = (variant_name(*v).strip() if len(v) == 3 else
                 f"multi_answer  ref={v[1]} (groups of 4 answers, 3 pairs)")
        t, n = trace(run, v)
        program = programs.Program("train", label, mesh, t, model=lambda v=v: trace(plain, v)[0], pairs=n)
        r = report.compile_and_measure(program, chip, chip.hbm_gib)
        per_pair[label] = r.get("estimated_s", float("nan")) / n
        print(f"{label}: {n} pairs over {len(devices)} {chip.name} chips; {report.describe(r, chip)}", flush=True)
    trl = per_pair[variant_name("concat", "model", True).strip()]
    print(f"| layout, reference | est. ms/pair on {_TOPOLOGY.value} | TRL's step / this |\n|---|---|---|")
    for label, seconds in per_pair.items():
        print(f"| {label} | {seconds * 1e3:.2f} | {trl / seconds:.2f}× |")


def print_ratios(kind, value):
    """Ratios of per-pair costs (`value(key)`: seconds or FLOPs per pair) against the concat baselines."""
    sp, base = value(("shared_prefix", "precomputed")), value(("concat", "model"))
    print(f"{kind}: shared_prefix / concat, online reference:       {base / value(('shared_prefix', 'model')):.2f}×")
    print(f"{kind}: shared_prefix / concat, precomputed reference:  {value(('concat', 'precomputed')) / sp:.2f}×")
    print(f"{kind}: shared_prefix + precomputed vs concat + online: {base / sp:.2f}×")
    print(f"{kind}: shared_prefix + precomputed vs concat + online with all-position logits (TRL's step): "
          f"{value(('concat', 'model', 'full_logits')) / sp:.2f}×")


def variant_key(layout, reference, full_logits):
    return (layout, reference) + (("full_logits",) if full_logits else ())


def main(argv):
    del argv
    layers.QUERY_BLOCK = _QUERY_BLOCK.value or 1 << 30
    cfg, run = model_config()
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    rng = np.random.default_rng(0)
    B = _PAIRS.value
    adapter, prepared = image_input(cfg, rng)
    pairs = make_pairs(cfg, B, rng, adapter, prepared)
    pixels = adapter.collate([prepared] * B)[0]
    per_module, active = parameter_counts(families.abstract_model(cfg, run))
    total, text = sum(per_module.values()), cfg.text
    print(f"devices: {jax.device_count()} × {jax.devices()[0].device_kind}; model {total / 1e6:.1f}M params in "
          f"total, {active / 1e6:.1f}M active per token ("
          + ", ".join(f"{name} {n / 1e6:.1f}M" for name, n in per_module.items())
          + f"; decoder {text.num_layers}×{text.hidden_size}); "
          f"{B} pairs/step, prompt {IMAGE}+{PROMPT}, answers {ANSWER}+{ANSWER}; "
          f"vision tower {'frozen' if _FREEZE_VISION.value else 'trained'}")

    if _COMPILE_ONLY.value:
        ref = {"chosen_logp": np.zeros(B, np.float32), "rejected_logp": np.zeros(B, np.float32)}
        t0 = time.perf_counter()
        traced, _, _ = trace_variant(cfg, run, mesh, pairs, pixels, ref, "concat", "model", False, abstract=True)
        lowered = traced.lower()
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
        print(f"concat step, online reference, {text.num_layers} decoder layers "
              f"{'scanned' if run.scan(text.num_layers) else 'unrolled'}: traced and lowered in {t1 - t0:.1f}s, "
              f"compiled in {t2 - t1:.1f}s, total {t2 - t0:.1f}s")
        return

    if _TOPOLOGY.value:
        tpu_plan(cfg, pairs, pixels)
        return

    if _PRESET.value:
        ref = {"chosen_logp": np.zeros(B, np.float32), "rejected_logp": np.zeros(B, np.float32)}
        flops = {}
        for variant in VARIANTS:
            traced = trace_variant(cfg, run, mesh, pairs, pixels, ref, *variant, abstract=True)[0]
            flops[variant_key(*variant)] = per_pair = preset_flops(traced, B)
            print(f"{variant_name(*variant)} {per_pair[0] / 1e12:8.2f} TFLOP/pair (lowered), matmuls "
                  f"{per_pair[1] / 1e12:.2f}")
        for i, kind in enumerate(("FLOPs", "matmul FLOPs")):
            print_ratios(kind, lambda key: flops[key][i])
        trl = flops[("concat", "model", "full_logits")]
        for variant in VARIANTS[:-1]:
            f = flops[variant_key(*variant)]
            print(f"FLOPs: TRL's step / {variant_name(*variant).strip()}: {trl[0] / f[0]:.2f}×, matmuls "
                  f"{trl[1] / f[1]:.2f}×")
        for reference in ("model", "precomputed"):
            traced, n = trace_groups(cfg, run, mesh, pairs, pixels, reference)
            f = preset_flops(traced, n)
            print(f"multi_answer  ref={reference:11s} {f[0] / 1e12:8.2f} TFLOP/pair (lowered; groups of 4 answers, "
                  f"3 pairs), matmuls {f[1] / 1e12:.2f}; TRL's step / this: {trl[0] / f[0]:.2f}×, matmuls "
                  f"{trl[1] / f[1]:.2f}×")
        return

    base_model = families.create(cfg, run, mesh=mesh, seed=0)
    shared_batch, _ = packing.pack(pairs, layout="shared_prefix", seq_len=IMAGE + PROMPT + 2 * ANSWER,
                                   max_answer_len=ANSWER, mrope=bool(cfg.text.mrope_section), images=pixels)
    ref = jax.jit(lambda b: logps.pair_logps(base_model, b, layout="shared_prefix"))(shared_batch)
    ref = {k: np.asarray(v) for k, v in ref.items()}
    runs = {}
    for variant in VARIANTS:
        t0 = time.perf_counter()
        traced, state, batch = trace_variant(cfg, run, mesh, pairs, pixels, ref, *variant, abstract=False)
        compiled = traced.lower().compile()
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        state, metrics = compiled(state, batch)
        runs[variant_key(*variant)] = dict(
            name=variant_name(*variant), compiled=compiled, state=state, batch=batch, loss=float(metrics["loss"]),
            flops=compiled.cost_analysis()["flops"] / B, times=[],
            info=f"compile {compile_s:.1f}s; memory: args {mem.argument_size_in_bytes / 2**20:.0f} MiB, "
                 f"out {mem.output_size_in_bytes / 2**20:.0f} MiB, temp {mem.temp_size_in_bytes / 2**20:.0f} MiB")

    # Timed steps interleaved: round r runs one step of every variant, so the machine's drift over the
    # minutes of a run weighs on all of them alike.
    for r in range(1 + _STEPS.value):
        for run in runs.values():
            t0 = time.perf_counter()
            run["state"], metrics = run["compiled"](run["state"], run["batch"])
            jax.block_until_ready(metrics)
            if r:  # round 0 is a second warm-up step
                run["times"].append(time.perf_counter() - t0)
    peak = matmul_peak()
    print(f"matmul peak (fp32 n² @ n², n = 1024 or 2048): {peak / 1e9:.0f} GFLOP/s; causal attention "
          f"{'in query blocks of ' + str(_QUERY_BLOCK.value) if _QUERY_BLOCK.value else 'as one dense product'}")
    for run in runs.values():
        times = run["times"]
        run["median"] = statistics.median(times)
        rate = run["flops"] * B / run["median"]
        print(f"{run['name']} {B / run['median']:7.3f} pairs/s  median {run['median'] * 1e3:8.1f} ms over "
              f"{len(times)} steps (min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}); "
              f"{run['flops'] / 1e9:.1f} GFLOP/pair = {rate / 1e9:.0f} GFLOP/s ({rate / peak:.0%} of peak); "
              f"{run['info']}; step-0 loss {run['loss']:.6f}")

    losses = [run["loss"] for run in runs.values()]
    print(f"step-0 losses agree: max |Δ| = {max(losses) - min(losses):.2e}")
    print_ratios("time ", lambda key: runs[key]["median"])
    print_ratios("FLOPs", lambda key: runs[key]["flops"])


if __name__ == "__main__":
    app.run(main)
