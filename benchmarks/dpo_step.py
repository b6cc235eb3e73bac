"""DPO step throughput: shared-prefix vs concat layout, online vs precomputed reference.

    python benchmarks/dpo_step.py [--pairs=4] [--steps=7] [--width=256] [--layers=4] [--freeze_vision]
    python benchmarks/dpo_step.py --preset=llava-1.5-7b   # FLOPs only: lowered, never compiled or run

Model: a LLaVA with a SigLIP tower at 336 px / patch 14 (576 image tokens; width 128, 2 layers) and a
Qwen2 decoder (width --width, --layers layers, 4 heads / 2 KV heads, MLP 2.75×, vocab 8192), fp32.
Data: a 576-token image + 64-token instruction prompt, 128-token chosen and rejected answers.
All variants run in one process on the same parameters and batch: compiled ahead of time (the memory
analysis is printed), 2 warm-up steps each, then --steps rounds that time one step of every variant in
turn (batch already on device); each variant's median is reported. The reference log-likelihoods for
"precomputed" come from the same model, so every variant computes the same loss; the script checks that.
Each variant's floating-point operations per pair, as XLA counts them in the compiled step
(`cost_analysis`), are printed beside its time, with the FLOP ratios beside the time ratios.

`--preset=llava-1.5-7b` counts the same five steps for LLaVA-1.5-7B's shapes (CLIP ViT-L/14 at 336 px,
576 image tokens; Llama 7B, 32 × 4096, vocab 32064; bfloat16) without memory: the state is abstract and
each step is only lowered, so the count is XLA's for the unoptimized program. It is the ceiling on the
time ratios for a compute-bound accelerator at that scale.

Both layouts send only answer positions through the LM head. A fifth variant times the concat layout
the way TRL's `concatenated_forward` computes it with its default `use_logits_to_keep=False`: logits at
every position, then the answer tokens picked — the anchor's own cost, reported apart.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
import transformers
from absl import app, flags

from rdpo_jax import optim, packing, sharding, train_step
from rdpo_jax.models import config as config_lib
from rdpo_jax.models import llava

_PAIRS = flags.DEFINE_integer("pairs", 4, "Pairs per step.")
_STEPS = flags.DEFINE_integer("steps", 7, "Timed steps per variant (median reported).")
_WIDTH = flags.DEFINE_integer("width", 256, "Decoder width.")
_LAYERS = flags.DEFINE_integer("layers", 4, "Decoder layers.")
_FREEZE_VISION = flags.DEFINE_bool("freeze_vision", False, "Freeze the vision tower (no backward through it).")
_PRESET = flags.DEFINE_enum("preset", None, ["llava-1.5-7b"], "Count FLOPs for a real model's shapes instead of timing.")

IMAGE, PROMPT, ANSWER = 576, 64, 128


def model_config():
    """(architecture, run settings) of the benchmark model."""
    if _PRESET.value == "llava-1.5-7b":  # llava-hf/llava-1.5-7b-hf's config.json, architecture fields
        hf = transformers.LlavaConfig(
            vision_config=dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                               num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14,
                               projection_dim=768, hidden_act="quick_gelu"),
            text_config=dict(model_type="llama", vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                             num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                             max_position_embeddings=4096, rms_norm_eps=1e-5),
            image_token_index=32000, vision_feature_layer=-2, vision_feature_select_strategy="default",
            projector_hidden_act="gelu")
        return config_lib.from_hf(hf), config_lib.RunSettings(param_dtype=jnp.bfloat16, check_image_tokens=False)
    hf = transformers.LlavaConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=128, intermediate_size=512,
                           num_hidden_layers=2, num_attention_heads=4, image_size=336, patch_size=14),
        text_config=dict(model_type="qwen2", vocab_size=8192, hidden_size=_WIDTH.value,
                         intermediate_size=int(2.75 * _WIDTH.value), num_hidden_layers=_LAYERS.value,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096),
        image_token_index=8191, vision_feature_layer=-1, vision_feature_select_strategy="full")
    return config_lib.from_hf(hf), config_lib.RunSettings()


def make_pairs(cfg, n, rng):
    assert cfg.image_seq_len == IMAGE
    pairs = []
    for _ in range(n):
        prompt = [1] + [cfg.image_token_id] * IMAGE + list(rng.integers(2, 8000, PROMPT - 1))
        pairs.append(packing.Pair(prompt, list(rng.integers(2, 8000, ANSWER)), list(rng.integers(2, 8000, ANSWER))))
    return pairs


def full_sequence_token_logps(model, batch, pixel_values):
    """`packing.token_logps` as TRL computes it by default: the LM head and log-softmax at all T positions."""
    hidden = model.hidden_states(batch["input_ids"], pixel_values, packing.attention_mask(batch["branch_ids"]),
                                 batch["positions"])
    logps = jax.nn.log_softmax(model.logits(hidden), axis=-1)  # float32[R, T, V]
    logps = jnp.take_along_axis(logps, batch["target_index"][..., None], axis=1)
    picked = jnp.take_along_axis(logps, batch["targets"][..., None], axis=-1)[..., 0]
    return jnp.where(batch["target_branch"] > 0, picked, 0.0)


VARIANTS = [("concat", "model", False), ("concat", "precomputed", False), ("shared_prefix", "model", False),
            ("shared_prefix", "precomputed", False), ("concat", "model", True)]


def variant_name(layout, reference, full_logits):
    return f"{layout:13s} ref={reference:11s}" + (" all-position logits (TRL)" if full_logits else "")


def lower_variant(cfg, run, mesh, pairs, pixels, ref, layout, reference, full_logits, *, abstract):
    """(lowered step, state, device batch) of one variant; abstract = shapes only (no memory, no run)."""
    B = len(pairs)
    optimizer = optim.make_optimizer(learning_rate=1e-5, weight_decay=0.0)
    freeze = ("vision_tower/.*",) if _FREEZE_VISION.value else ()
    seq_len = IMAGE + PROMPT + (2 * ANSWER if layout == "shared_prefix" else ANSWER)
    batch, _ = packing.pack_pairs(pairs, layout=layout, seq_len=seq_len, max_answer_len=ANSWER)
    batch.update(pixel_values=pixels, valid=np.ones(B, np.float32))
    if reference == "precomputed":
        batch.update(ref_chosen_logp=ref["chosen_logp"], ref_rejected_logp=ref["rejected_logp"])
    shardings = train_step.batch_shardings(batch, mesh)
    anchor_forward = mock.patch.object(packing, "token_logps", full_sequence_token_logps)
    with anchor_forward if full_logits else contextlib.nullcontext():
        if abstract:
            graphdef, state = train_step.abstract_state(cfg, run, optimizer, mesh, freeze=freeze,
                                                        reference=reference == "model")
            batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in batch.items()}
        else:
            graphdef, state = train_step.init_state(llava.create(cfg, run, mesh=mesh, seed=0), optimizer, freeze=freeze,
                                                    reference=reference == "model")
            batch = jax.device_put(batch, shardings)
        fn = train_step.make_dpo_step(graphdef, optimizer, optax.constant_schedule(1e-5), loss_type="sigmoid",
                                      beta=0.1, pair_layout=layout, reference=reference).train
        return train_step.jit_step(fn, state, batch, mesh).lower(state, batch), state, batch


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
    cfg, run = model_config()
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    rng = np.random.default_rng(0)
    B = _PAIRS.value
    pairs = make_pairs(cfg, B, rng)
    pixels = rng.standard_normal((B, 336, 336, 3)).astype(np.float32)
    n_params = sum(x.size for x in jax.tree.leaves(optim.split_params(llava.abstract_model(cfg, run))[1]))
    text = cfg.text
    print(f"devices: {jax.device_count()} × {jax.devices()[0].device_kind}; model {n_params / 1e6:.1f}M params "
          f"(decoder {text.num_layers}×{text.hidden_size}, vision {cfg.vision.num_layers}×{cfg.vision.hidden_size}); "
          f"{B} pairs/step, prompt {IMAGE}+{PROMPT}, answers {ANSWER}+{ANSWER}; "
          f"vision tower {'frozen' if _FREEZE_VISION.value else 'trained'}")

    if _PRESET.value:
        ref = {"chosen_logp": np.zeros(B, np.float32), "rejected_logp": np.zeros(B, np.float32)}
        flops = {}
        for variant in VARIANTS:
            lowered, _, _ = lower_variant(cfg, run, mesh, pairs, pixels, ref, *variant, abstract=True)
            flops[variant_key(*variant)] = lowered.cost_analysis()["flops"] / B
            print(f"{variant_name(*variant)} {flops[variant_key(*variant)] / 1e12:8.2f} TFLOP/pair (lowered)")
        print_ratios("FLOPs", flops.__getitem__)
        return

    base_model = llava.create(cfg, run, mesh=mesh, seed=0)
    shared_batch, _ = packing.pack_pairs(pairs, layout="shared_prefix", seq_len=IMAGE + PROMPT + 2 * ANSWER,
                                         max_answer_len=ANSWER)
    ref = jax.jit(lambda b, p: packing.pair_logps(base_model, b, p, layout="shared_prefix"))(shared_batch, pixels)
    ref = {k: np.asarray(v) for k, v in ref.items()}
    runs = {}
    for variant in VARIANTS:
        t0 = time.perf_counter()
        lowered, state, batch = lower_variant(cfg, run, mesh, pairs, pixels, ref, *variant, abstract=False)
        compiled = lowered.compile()
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
    for run in runs.values():
        times = run["times"]
        run["median"] = statistics.median(times)
        print(f"{run['name']} {B / run['median']:7.3f} pairs/s  median {run['median'] * 1e3:8.1f} ms over "
              f"{len(times)} steps (min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}); "
              f"{run['flops'] / 1e9:.1f} GFLOP/pair; {run['info']}; step-0 loss {run['loss']:.6f}")

    losses = [run["loss"] for run in runs.values()]
    print(f"step-0 losses agree: max |Δ| = {max(losses) - min(losses):.2e}")
    print_ratios("time ", lambda key: runs[key]["median"])
    print_ratios("FLOPs", lambda key: runs[key]["flops"])


if __name__ == "__main__":
    app.run(main)
