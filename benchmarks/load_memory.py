"""Host memory `load_hf` holds beyond the model, against the decoder's depth (stacked and per-layer).

    python benchmarks/load_memory.py --workdir=/tmp/bench_load_memory [--depths=12,24] [--scan_layers=on,off] [--fsdp=8|0]

For each depth, writes (once) a random transformers LLaVA — a 2-layer SigLIP tower and a Qwen2 decoder
1024 wide (MLP 2816, vocab 16000), float32, one `model.safetensors` — and loads it with every
`--scan_layers` setting in a fresh process onto a ("data", "fsdp", "tensor") = (1, 8, 1) mesh of 8 CPU
devices (`--fsdp=0`: one device). Reports the peak anonymous RSS during the load above the RSS before it, minus the loaded
model's bytes (on CPU the device buffers are host memory): what loading holds in flight. The slope is
the growth of that overhead per byte of model between consecutive depths: near 0 when loading streams
whatever the depth, near 1 or more when a stacked weight's whole [L, …] array passes through host memory.
"""

import json
import os
import subprocess
import sys
import threading
import time

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/bench_load_memory", "Where the checkpoints are written.")
_DEPTHS = flags.DEFINE_list("depths", ["12", "24"], "Decoder depths to measure.")
_SCAN = flags.DEFINE_list("scan_layers", ["on", "off"], "model.scan_layers settings to load each depth with.")
_FSDP = flags.DEFINE_integer("fsdp", 8, "Load onto a (1, FSDP, 1) mesh of FSDP CPU devices; 0: one device, no mesh.")
_CHILD = flags.DEFINE_string("child", None, "Internal: 'FOLDER:SCAN' to load once and print the measurement.")


def _anon_rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024


def _peak_during(fn) -> tuple[object, float]:
    """fn()'s result and the highest anonymous RSS (MiB) seen while it ran, sampled every 2 ms."""
    peak, done = [_anon_rss_mib()], threading.Event()

    def sample():
        while not done.wait(0.002):
            peak[0] = max(peak[0], _anon_rss_mib())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        return fn(), peak[0]
    finally:
        done.set()
        thread.join()


def hf_config(depth: int):
    import transformers

    return transformers.LlavaConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8),
        text_config=dict(model_type="qwen2", vocab_size=16000, hidden_size=1024, intermediate_size=2816,
                         num_hidden_layers=depth, num_attention_heads=16, num_key_value_heads=8,
                         max_position_embeddings=4096),
        image_token_index=15999, vision_feature_layer=-1, vision_feature_select_strategy="full")


def write(folder: str, depth: int):
    import torch
    import transformers

    torch.manual_seed(depth)
    transformers.LlavaForConditionalGeneration(hf_config(depth)).save_pretrained(folder)


def child(spec: str):
    folder, scan = spec.rsplit(":", 1)
    import jax
    from flax import nnx
    from rdpo_jax import sharding
    from rdpo_jax.models import config as config_lib
    from rdpo_jax.models import hf

    mesh = sharding.make_mesh({"data": 1, "fsdp": _FSDP.value, "tensor": 1}) if _FSDP.value else None
    hf.read_config(folder)  # the one-time transformers import, outside the measurement
    base = _anon_rss_mib()

    def load():
        model, _ = hf.load_hf(folder, config_lib.RunSettings(scan_layers=scan), mesh=mesh)
        return jax.block_until_ready(jax.tree.leaves(nnx.state(model)))

    start = time.perf_counter()
    leaves, peak = _peak_during(load)
    seconds = time.perf_counter() - start
    model_mib = sum(s.data.nbytes for x in leaves for s in x.addressable_shards) / 2**20
    print(json.dumps(dict(model_mib=model_mib, over_mib=peak - base - model_mib, seconds=seconds)))


def main(argv):
    if _CHILD.value:
        return child(_CHILD.value)
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={max(_FSDP.value, 1)}", JAX_PLATFORMS="cpu")
    rows = []
    for depth in map(int, _DEPTHS.value):
        folder = os.path.join(_WORKDIR.value, f"depth{depth}")
        if not os.path.exists(os.path.join(folder, "model.safetensors")):
            write(folder, depth)
        for scan in _SCAN.value:
            out = subprocess.run([sys.executable, __file__, f"--child={folder}:{scan}", f"--fsdp={_FSDP.value}"], env=env, check=True,
                                 capture_output=True, text=True).stdout
            rows.append(dict(depth=depth, scan=scan, **json.loads(out.strip().splitlines()[-1])))
    print("| depth | scan_layers | model MiB | peak anon RSS beyond the model, MiB | load s |")
    print("| --- | --- | --- | --- | --- |")
    for r in sorted(rows, key=lambda r: (r["scan"], r["depth"])):
        print(f"| {r['depth']} | {r['scan']} | {r['model_mib']:.0f} | {r['over_mib']:.0f} | {r['seconds']:.1f} |")
    for scan in _SCAN.value:
        mine = sorted((r for r in rows if r["scan"] == scan), key=lambda r: r["depth"])
        for a, b in zip(mine, mine[1:]):
            slope = (b["over_mib"] - a["over_mib"]) / (b["model_mib"] - a["model_mib"])
            print(f"scan_layers={scan}: depth {a['depth']} -> {b['depth']}: slope {slope:.2f} per model byte")


if __name__ == "__main__":
    app.run(main)
