"""The shipped TPU configs (7B, 8B, 30B-A3B, Qwen3.5-27B) compiled for their slice, and the variants tried to
raise their throughput.

    python benchmarks/tpu_plans.py --model=llava-1.5-7b [--topology=v5p-64] [--variants=base,pairs128,…] [--json=FILE]
    python benchmarks/tpu_plans.py --model=qwen2.5-vl-7b      # or qwen3-vl-8b, qwen3-vl-30b-a3b, qwen3.5-27b
    python benchmarks/tpu_plans.py --model=llava-1.5-7b --write_config=/tmp/llava-1.5-7b   # for rdpo_jax.compile

Each variant is the model's shipped TPU config (`CONFIGS`) with a few fields changed, its train step
compiled by XLA:TPU for the slice (`rdpo_jax.compile`: libtpu on this CPU host) at its longest row bucket: memory
per chip, matmul FLOPs through every loop, XLA's estimated step time (its cost model, not a measurement) and
the pairs/s and model-FLOPs utilisation that implies. The architecture comes from each model's published
`config.json` (written here: no weights are read). Layout variants carry their own bucket: a concat row holds
one answer, a multi-answer row a group's answers.
"""

from __future__ import annotations

import json
import tempfile

from absl import app, flags

from configs import llava15_7b_tpu, qwen25vl_7b_tpu, qwen35_27b_tpu, qwen3vl_8b_tpu, qwen3vl_30b_a3b_tpu
from rdpo_jax.compile import chips, programs, report
import presets  # benchmarks/presets.py

# preset (its architecture) -> the shipped TPU config sized for it
CONFIGS = {"llava-1.5-7b": llava15_7b_tpu, "qwen2.5-vl-7b": qwen25vl_7b_tpu, "qwen3-vl-8b": qwen3vl_8b_tpu,
           "qwen3-vl-30b-a3b": qwen3vl_30b_a3b_tpu, "qwen3.5-27b": qwen35_27b_tpu}

_MODEL = flags.DEFINE_enum("model", "llava-1.5-7b", list(CONFIGS), "Which shipped config.")
_TOPOLOGY = flags.DEFINE_string("topology", "v5p-64", "TPU slice (rdpo_jax.compile --topology).")
_VARIANTS = flags.DEFINE_list("variants", None, "Variants to compile (default: all of the model's).")
_OUT = flags.DEFINE_string("json", None, "Also write every variant's figures to this file.")
_WRITE = flags.DEFINE_string("write_config", None, "Only write the model's config.json into this folder (for "
                             "python -m rdpo_jax.compile --config=…:model=FOLDER) and exit.")


# name -> config fields changed from the shipped config ("data.seq_buckets" is always its longest bucket here)
VARIANTS = {
    "base": {},
    "pairs128": {"data.batch_size": 128},
    "pairs256": {"data.batch_size": 256},
    "pairs512": {"data.batch_size": 512},
    "dots256": {"data.batch_size": 256, "model.remat": "dots_saveable"},
    "noremat128": {"data.batch_size": 128, "model.remat": "none"},
    "precomputed256": {"data.batch_size": 256, "dpo.reference": "precomputed"},
    "concat256": {"data.batch_size": 256, "dpo.pair_layout": "concat"},
    "multi_answer64": {"data.batch_size": 64, "dpo.pair_layout": "multi_answer", "data.max_answers_per_group": 4},
}
# a concat row holds the prompt and one answer; a multi-answer row a prompt's 4 samples (and up to 4 pairs of them)
LAYOUT_BUCKET = {"concat": lambda t, answer: t - answer, "multi_answer": lambda t, answer: t + 2 * answer}


def variant_config(model: str, folder: str, fields: dict):
    config = CONFIGS[model].get_config(f"model={folder},data=unused")
    bucket = config.data.seq_buckets[-1]
    layout = fields.get("dpo.pair_layout")
    if layout in LAYOUT_BUCKET:
        bucket = LAYOUT_BUCKET[layout](bucket, config.data.max_answer_len)
    with config.unlocked():
        config.data.eval = ""
        config.data.seq_buckets = (bucket,)
        for name, value in fields.items():
            group, field = name.split(".")
            config[group][field] = value
    return config


def main(argv):
    del argv
    if _WRITE.value:
        presets.hf_config(_MODEL.value).save_pretrained(_WRITE.value)
        return
    _, chip, devices = chips.devices(_TOPOLOGY.value)
    folder = tempfile.mkdtemp()
    presets.hf_config(_MODEL.value).save_pretrained(folder)
    rows = []
    for name in _VARIANTS.value or list(VARIANTS):
        config = variant_config(_MODEL.value, folder, VARIANTS[name])
        kind = "groups" if config.dpo.pair_layout == "multi_answer" else "pairs"
        (program,) = programs.build(config, devices, names=("train",), kind=kind)
        r = report.compile_and_measure(program, chip, chip.hbm_gib)
        r["variant"] = name
        rows.append(r)
        print(f"## {name} {VARIANTS[name]}\n{report.describe(r, chip)}", flush=True)
        if _OUT.value:
            with open(_OUT.value, "w") as f:
                json.dump(rows, f, indent=1)
    print(f"\n| variant | rows × tokens | pairs | memory per chip (GiB) | est. step (s) | est. pairs/s | est. MFU |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | {r['what']} | {r['pairs']} | does not fit | | | |")
            continue
        if "estimated_s" not in r:  # XLA's cost model gave no usable time (e.g. negative: docs/benchmarks.md)
            print(f"| {r['variant']} | {r['what']} | {r['pairs']} | {r['total'] / 2**30:.1f} | none (XLA: "
                  f"{r['xla_seconds']:.2f} s) | | |")
            continue
        print(f"| {r['variant']} | {r['what']} | {r['pairs']} | {r['total'] / 2**30:.1f} | {r['estimated_s']:.2f} | "
              f"{r['pairs'] / r['estimated_s']:.0f} | {100 * r['mfu']:.0f}% |")


if __name__ == "__main__":
    app.run(main)
