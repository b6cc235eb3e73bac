"""DPO step throughput: shared-prefix vs concat layout, online vs precomputed reference.

    python benchmarks/dpo_step.py [--pairs=4] [--steps=7] [--width=256] [--layers=4] [--freeze_vision]

Model: a LLaVA with a SigLIP tower at 336 px / patch 14 (576 image tokens; width 128, 2 layers) and a
Qwen2 decoder (width --width, --layers layers, 4 heads / 2 KV heads, MLP 2.75×, vocab 8192), fp32.
Data: a 576-token image + 64-token instruction prompt, 128-token chosen and rejected answers.
All variants run in one process on the same parameters and batch: compiled ahead of time (the memory
analysis is printed), 2 warm-up steps each, then --steps rounds that time one step of every variant in
turn (batch already on device); each variant's median is reported. The reference log-likelihoods for
"precomputed" come from the same model, so every variant computes the same loss; the script checks that.

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

IMAGE, PROMPT, ANSWER = 576, 64, 128


def model_config():
    hf = transformers.LlavaConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=128, intermediate_size=512,
                           num_hidden_layers=2, num_attention_heads=4, image_size=336, patch_size=14),
        text_config=dict(model_type="qwen2", vocab_size=8192, hidden_size=_WIDTH.value,
                         intermediate_size=int(2.75 * _WIDTH.value), num_hidden_layers=_LAYERS.value,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096),
        image_token_index=8191, vision_feature_layer=-1, vision_feature_select_strategy="full")
    return config_lib.from_hf(hf)


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


def main(argv):
    del argv
    cfg = model_config()
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    rng = np.random.default_rng(0)
    B = _PAIRS.value
    pairs = make_pairs(cfg, B, rng)
    pixels = rng.standard_normal((B, 336, 336, 3)).astype(np.float32)
    base_model = llava.create(cfg, mesh=mesh, seed=0)
    n_params = sum(x.size for x in jax.tree.leaves(optim.split_params(base_model)[1]))
    print(f"devices: {jax.device_count()} × {jax.devices()[0].device_kind}; model {n_params / 1e6:.1f}M params "
          f"(decoder {_LAYERS.value}×{_WIDTH.value}); {B} pairs/step, prompt {IMAGE}+{PROMPT}, answers "
          f"{ANSWER}+{ANSWER}; vision tower {'frozen' if _FREEZE_VISION.value else 'trained'}")

    shared_batch, _ = packing.pack_pairs(pairs, layout="shared_prefix", seq_len=IMAGE + PROMPT + 2 * ANSWER,
                                         max_answer_len=ANSWER)
    ref = jax.jit(lambda b, p: packing.pair_logps(base_model, b, p, layout="shared_prefix"))(shared_batch, pixels)
    ref = {k: np.asarray(v) for k, v in ref.items()}

    optimizer = optim.make_optimizer(learning_rate=1e-5, weight_decay=0.0)
    schedule = optax.constant_schedule(1e-5)
    freeze = ("vision_tower/.*",) if _FREEZE_VISION.value else ()
    variants = [("concat", "model", False), ("concat", "precomputed", False), ("shared_prefix", "model", False),
                ("shared_prefix", "precomputed", False), ("concat", "model", True)]
    runs = {}
    for layout, reference, full_logits in variants:
        seq_len = IMAGE + PROMPT + (2 * ANSWER if layout == "shared_prefix" else ANSWER)
        batch, _ = packing.pack_pairs(pairs, layout=layout, seq_len=seq_len, max_answer_len=ANSWER)
        batch.update(pixel_values=pixels, valid=np.ones(B, np.float32))
        if reference == "precomputed":
            batch.update(ref_chosen_logp=ref["chosen_logp"], ref_rejected_logp=ref["rejected_logp"])
        anchor_forward = mock.patch.object(packing, "token_logps", full_sequence_token_logps)
        with anchor_forward if full_logits else contextlib.nullcontext():
            graphdef, state = train_step.init_state(llava.create(cfg, mesh=mesh, seed=0), optimizer, freeze=freeze,
                                                    reference=reference == "model")
            fn = train_step.make_dpo_step(graphdef, optimizer, schedule, loss_type="sigmoid", beta=0.1,
                                          pair_layout=layout, reference=reference)
            device_batch = jax.device_put(batch, train_step.batch_shardings(batch, mesh))
            t0 = time.perf_counter()
            compiled = train_step.jit_step(fn, state, batch, mesh).lower(state, device_batch).compile()
            compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        state, metrics = compiled(state, device_batch)
        name = f"{layout:13s} ref={reference:11s}" + (" all-position logits (TRL)" if full_logits else "")
        key = (layout, reference) + (("full_logits",) if full_logits else ())
        runs[key] = dict(name=name, compiled=compiled, state=state, batch=device_batch, loss=float(metrics["loss"]),
                         times=[], info=f"compile {compile_s:.1f}s; memory: args {mem.argument_size_in_bytes / 2**20:.0f} "
                                        f"MiB, out {mem.output_size_in_bytes / 2**20:.0f} MiB, temp "
                                        f"{mem.temp_size_in_bytes / 2**20:.0f} MiB")

    # Timed steps interleaved: round r runs one step of every variant, so the machine's drift over the
    # minutes of a run weighs on all of them alike.
    for r in range(1 + _STEPS.value):
        for run in runs.values():
            t0 = time.perf_counter()
            run["state"], metrics = run["compiled"](run["state"], run["batch"])
            jax.block_until_ready(metrics)
            if r:  # round 0 is a second warm-up step
                run["times"].append(time.perf_counter() - t0)
    results = {}
    for key, run in runs.items():
        times = run["times"]
        med = statistics.median(times)
        results[key] = (med, run["loss"])
        print(f"{run['name']} {B / med:7.3f} pairs/s  median {med * 1e3:8.1f} ms over {len(times)} steps "
              f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}); {run['info']}; step-0 loss {run['loss']:.6f}")

    losses = [loss for _, loss in results.values()]
    print(f"step-0 losses agree: max |Δ| = {max(losses) - min(losses):.2e}")
    base = results[("concat", "model")][0]
    print(f"shared_prefix / concat, online reference:      {base / results[('shared_prefix', 'model')][0]:.2f}×")
    print(f"shared_prefix / concat, precomputed reference: "
          f"{results[('concat', 'precomputed')][0] / results[('shared_prefix', 'precomputed')][0]:.2f}×")
    print(f"shared_prefix + precomputed vs concat + online: {base / results[('shared_prefix', 'precomputed')][0]:.2f}×")
    anchor = results[("concat", "model", "full_logits")][0]
    print(f"shared_prefix + precomputed vs concat + online with all-position logits (TRL's step): "
          f"{anchor / results[('shared_prefix', 'precomputed')][0]:.2f}×")


if __name__ == "__main__":
    app.run(main)
