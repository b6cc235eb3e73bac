"""Host memory of a few training steps on this CPU: full fine-tuning, LoRA and QLoRA of a mid-size Qwen2.5-VL.

    python benchmarks/lora_memory.py --workdir=/tmp/bench_lora_memory [--modes=full,lora,qlora] [--steps=2]

Writes (once) the smoke setup of `data_prep.smoke --family=qwen2_5_vl` (its pairs and tokenizer) and beside
it a random Qwen2.5-VL with Qwen2.5-0.5B's layers, 16 of them, and a 32000-token vocabulary (896 wide, MLP
4864, untied head: 304M parameters, float32 safetensors), then runs `python -m rdpo_jax.train` on one CPU
device for `--steps` steps of 8 pairs at 128 tokens per mode, each in a fresh process (no checkpoint but the
final one), and reports the train step's memory analysis (arguments, temporaries) and the process's peak
RSS (loading and the final checkpoint included):

  full   param_dtype float32, dpo.reference="model" (a frozen copy)
  lora   rank 16 on the decoder's projections, a bfloat16 base, dpo.reference="base" (adapters off)
  qlora  the same with the base's projections stored NF4
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before jax is imported (data_prep.smoke): no TPU probe

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/bench_lora_memory", "Setup, model and run folders.")
_MODES = flags.DEFINE_list("modes", ["full", "lora", "qlora"], "Modes to run (see the module doc).")
_STEPS = flags.DEFINE_integer("steps", 2, "Training steps per mode.")

LORA = ("--config.model.param_dtype=bfloat16", "--config.lora.rank=16", "--config.dpo.reference=base")
MODES = {"full": ("--config.model.param_dtype=float32", "--config.dpo.reference=model"),
         "lora": LORA, "qlora": (*LORA, "--config.lora.quantize=nf4")}
# Qwen2.5-0.5B's layers (14 heads of 64, 2 KV heads; M-RoPE sections of the 32 rotary pairs) over a
# 32000-token vocabulary the smoke tokenizer's ids fall within
DECODER = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=16, num_attention_heads=14,
               num_key_value_heads=2, vocab_size=32000,
               rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[8, 12, 12]))


def _setup(out: str) -> None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from data_prep import smoke

    if not os.path.exists(os.path.join(out, "pairs")):
        smoke.write_setup(out, family="qwen2_5_vl")
    if not os.path.exists(os.path.join(out, "model_mid", "config.json")):
        smoke.write_model(os.path.join(out, "model_mid"), family="qwen2_5_vl", **DECODER)


def _run(mode: str, out: str) -> dict:
    workdir = os.path.join(out, f"run_{mode}")
    subprocess.run(["rm", "-rf", workdir], check=True)
    command = [sys.executable, "-m", "rdpo_jax.train", f"--config=configs/smoke.py:dir={out},family=qwen2_5_vl",
               f"--workdir={workdir}", f"--config.model.path={out}/model_mid", "--config.data.eval=",
               "--config.mesh.data=1", "--config.mesh.fsdp=1", "--config.mesh.tensor=1",
               "--config.data.seq_buckets=(128,)", f"--config.total_steps={_STEPS.value}",
               "--config.checkpoint.every=1000", "--config.checkpoint.compile_cache=", *MODES[mode]]
    with open(os.path.join(out, f"{mode}.log"), "w+") as f:
        p = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        _, status, usage = os.wait4(p.pid, 0)  # this child's own peak RSS (ru_maxrss, KiB)
        f.seek(0)
        log = f.read()
    if status:
        sys.exit(f"{mode} failed (see {f.name}):\n{log[-3000:]}")
    m = re.search(r"memory per device: arguments ([\d.]+) MiB, outputs ([\d.]+) MiB, temporaries ([\d.]+) MiB", log)
    return dict(mode=mode, arguments=float(m[1]), temporaries=float(m[3]), peak_rss=usage.ru_maxrss / 1024)


def main(argv):
    del argv
    out = _WORKDIR.value
    _setup(out)
    print("| mode | step arguments (MiB) | step temporaries (MiB) | peak RSS (MiB) |\n|---|---|---|---|")
    for mode in _MODES.value:
        r = _run(mode, out)
        print(f"| {mode} | {r['arguments']:.0f} | {r['temporaries']:.0f} | {r['peak_rss']:.0f} |", flush=True)


if __name__ == "__main__":
    app.run(main)
