"""On-policy groups: multi-answer rows vs one row per pair (shared-prefix), pairs/s side by side.

    python benchmarks/groups.py [--family=llava|qwen2_5_vl] [--groups=2] [--steps=7] [--width=256] [--layers=4]

An on-policy round samples several answers per prompt and mines several pairs from them; here each prompt
(a 576-token image + 64-token instruction, the model of `benchmarks/dpo_step.py`) has 4 distinct 128-token
answers and 3 pairs sharing the chosen one (answer 0 over answers 1, 2, 3). The shared-prefix layout
packs each pair as its own row (`[prompt][chosen][rejected]`: the prompt, its image and the chosen answer
encoded 3 times); the multi-answer layout packs the group as one row `[prompt][a0][a1][a2][a3]`. Both run
the same DPO step (sigmoid loss, online or precomputed reference) on the same parameters; every variant is
compiled ahead of time, warmed up twice, then `--steps` rounds time one step of each in turn; medians
reported, with XLA's FLOPs per pair of each compiled step and the step-0 losses (which must agree).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dpo_step  # noqa: E402  (the benchmark model, its prompts and images; its flags --family, --width, --layers)

from rdpo_jax import logps, optim, packing, sharding, train_step  # noqa: E402
from rdpo_jax.models import families  # noqa: E402

_GROUPS = flags.DEFINE_integer("groups", 2, "Prompt groups per step (3 pairs each).")
ANSWERS, PAIRS = 4, ((0, 1), (0, 2), (0, 3))
A = dpo_step.ANSWER


def make_groups(cfg, n, rng) -> list[packing.Group]:
    groups = []
    for pair in dpo_step.make_pairs(cfg, n, rng):  # prompts (and M-RoPE positions) as dpo_step builds them
        answers = [list(rng.integers(2, 8000, A)) for _ in range(ANSWERS)]
        groups.append(packing.Group(pair.prompt, answers, PAIRS, pair.positions))
    return groups


def batches(cfg, groups, pixels) -> dict[str, dict]:
    """The same pairs in both layouts: {layout: batch}; pair p of group g is pair 3g + p in the
    shared-prefix batch and slot p of row g in the multi-answer one."""
    qwen = dpo_step.is_qwen(cfg)
    prompt = len(groups[0].prompt)
    multi, _ = packing.pack(groups, layout="multi_answer", seq_len=prompt + ANSWERS * A, max_answer_len=A,
                            max_answers=ANSWERS, max_pairs=len(PAIRS), mrope=qwen, images=pixels)
    pairs = [packing.Group(g.prompt, [g.answers[c], g.answers[r]], positions=g.positions)
             for g in groups for c, r in g.pairs]
    shared, _ = packing.pack(pairs, layout="shared_prefix", seq_len=prompt + 2 * A, max_answer_len=A, mrope=qwen,
                             images={k: np.repeat(v, len(PAIRS), axis=0) for k, v in pixels.items()})
    return {"shared_prefix": shared, "multi_answer": multi}


def main(argv):
    del argv
    cfg, run = dpo_step.model_config()
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    rng = np.random.default_rng(0)
    G = _GROUPS.value
    groups = make_groups(cfg, G, rng)
    data = batches(cfg, groups, dpo_step.image_arrays(cfg, G, rng))
    n_pairs = G * len(PAIRS)
    print(f"devices: {jax.device_count()} × {jax.devices()[0].device_kind}; {G} groups × {len(PAIRS)} pairs "
          f"({ANSWERS} distinct {A}-token answers per prompt of {len(groups[0].prompt)} tokens); rows: "
          + ", ".join(f"{k} {v.input_ids.shape}" for k, v in data.items()))

    base = families.create(cfg, run, mesh=mesh, seed=0)
    ref = jax.jit(lambda b: logps.pair_logps(base, b, layout="shared_prefix"))(data["shared_prefix"])
    ref_c, ref_r = np.asarray(ref["chosen_logp"]), np.asarray(ref["rejected_logp"])
    optimizer = optim.make_optimizer(learning_rate=1e-5, weight_decay=0.0)
    runs = {}
    for layout in ("shared_prefix", "multi_answer"):
        for reference in ("model", "precomputed"):
            batch = data[layout]
            if reference == "precomputed":
                shape = batch.valid.shape
                batch = batch.replace(ref_chosen_logp=ref_c.reshape(shape), ref_rejected_logp=ref_r.reshape(shape))
            graphdef, state = train_step.init_state(families.create(cfg, run, mesh=mesh, seed=0), optimizer,
                                                    reference=reference == "model")
            batch = jax.device_put(batch, batch.shardings(mesh))
            fn = train_step.make_dpo_step(graphdef, optimizer, optax.constant_schedule(1e-5), train_step.DPOSettings(
                loss_type="sigmoid", beta=0.1, pair_layout=layout, reference=reference)).train
            t0 = time.perf_counter()
            compiled = train_step.jit_step(fn, state, batch, mesh).lower(state, batch).compile()
            compile_s = time.perf_counter() - t0
            state, metrics = compiled(state, batch)
            runs[(layout, reference)] = dict(compiled=compiled, state=state, batch=batch, loss=float(metrics["loss"]),
                                             flops=compiled.cost_analysis()["flops"] / n_pairs, times=[],
                                             compile_s=compile_s)
    for r in range(1 + dpo_step._STEPS.value):  # round 0: a second warm-up step
        for v in runs.values():
            t0 = time.perf_counter()
            v["state"], metrics = v["compiled"](v["state"], v["batch"])
            jax.block_until_ready(metrics)
            if r:
                v["times"].append(time.perf_counter() - t0)
    for (layout, reference), v in runs.items():
        v["median"] = statistics.median(v["times"])
        print(f"{layout:13s} ref={reference:11s} {n_pairs / v['median']:7.3f} pairs/s  median "
              f"{v['median'] * 1e3:8.1f} ms (min {min(v['times']) * 1e3:.1f}, max {max(v['times']) * 1e3:.1f}); "
              f"{v['flops'] / 1e9:.1f} GFLOP/pair; compile {v['compile_s']:.1f}s; step-0 loss {v['loss']:.6f}")
    losses = [v["loss"] for v in runs.values()]
    print(f"step-0 losses agree: max |Δ| = {max(losses) - min(losses):.2e}")
    for reference in ("model", "precomputed"):
        s, m = runs[("shared_prefix", reference)], runs[("multi_answer", reference)]
        print(f"multi_answer / shared_prefix, {reference} reference: time {s['median'] / m['median']:.2f}×, "
              f"FLOPs {s['flops'] / m['flops']:.2f}×")


if __name__ == "__main__":
    app.run(main)
