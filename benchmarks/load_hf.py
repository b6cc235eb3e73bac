"""Load time and peak host memory of `load_hf` on a sharded multi-file checkpoint of a few hundred MB.

    python benchmarks/load_hf.py --workdir=/tmp/bench_load [--repeats=3]

Writes a LLaVA-shaped checkpoint (6-layer SigLIP-B-width tower + an 8-layer 1024-wide Qwen2 decoder,
bfloat16 like released checkpoints, about 340 MB in 100 MB safetensors shards + index) once, then loads it `repeats` times, each in a fresh process,
onto a ("data", "fsdp", "tensor") = (1, 8, 1) mesh of 8 CPU devices, and reports the median wall time and
peak anonymous RSS (heap + device buffers; the memory-mapped file pages are page cache, reported apart).
Both sides import transformers and parse the config before the timer starts (a one-time cost of a few
seconds per process that is not loading).
On the CPU backend device buffers live in host RAM, so the loaded model itself (its size is printed) is
part of the peak: the number to read is the peak minus baseline minus the model, i.e. the loader's
own overhead. transformers' `from_pretrained` of the same folder is timed the same way for reference.
"""

import json
import os
import statistics
import subprocess
import sys
import threading
import time

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/bench_load", "Where the checkpoint is written.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Fresh-process loads to take the median over.")
_CHILD = flags.DEFINE_enum("child", None, ["jax", "torch"], "Internal: run one measured load.")


def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class PeakSampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak_anon = self.peak_file = 0
        self.stop = False

    def run(self):
        while not self.stop:
            self.peak_anon = max(self.peak_anon, _rss_kib("RssAnon"))
            self.peak_file = max(self.peak_file, _rss_kib("RssFile"))
            time.sleep(0.002)


def config():
    import transformers

    return transformers.LlavaConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=768, intermediate_size=3072,
                           num_hidden_layers=6, num_attention_heads=12, image_size=224, patch_size=16),
        text_config=dict(model_type="qwen2", vocab_size=16000, hidden_size=1024, intermediate_size=2816,
                         num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=8,
                         max_position_embeddings=4096),
        image_token_index=15999, vision_feature_layer=-2, vision_feature_select_strategy="full")


def child(kind, folder):
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    if kind == "jax":
        import jax
        import jax.numpy as jnp
        from flax import nnx
        from rdpo_jax import sharding
        from rdpo_jax.models import config as config_lib
        from rdpo_jax.models import families, hf
        mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
        hf.read_config(folder)  # warm the one-time transformers import (seconds) outside the timer
    else:
        import torch
        import transformers
        transformers.AutoConfig.from_pretrained(folder)
        transformers.LlavaForConditionalGeneration  # noqa: B018 (import the modeling code)
    base = _rss_kib("RssAnon")
    sampler = PeakSampler()
    sampler.start()
    t0 = time.perf_counter()
    if kind == "jax":
        model, _ = hf.load_hf(folder, config_lib.RunSettings(param_dtype=jnp.bfloat16), mesh=mesh)
        leaves = jax.tree.leaves(nnx.state(model))
        jax.block_until_ready(leaves)
        device_bytes = sum(s.data.nbytes for x in leaves for s in x.addressable_shards)
    else:
        model = transformers.LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16)
        device_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    seconds = time.perf_counter() - t0
    sampler.stop = True
    sampler.join()
    print(json.dumps(dict(seconds=seconds, base_mib=base / 1024, peak_anon_mib=sampler.peak_anon / 1024,
                          peak_file_mib=sampler.peak_file / 1024, model_mib=device_bytes / 2**20)))


def main(argv):
    folder = os.path.join(_WORKDIR.value, "ckpt")
    if _CHILD.value:
        return child(_CHILD.value, folder)
    if not os.path.exists(os.path.join(folder, "model.safetensors.index.json")):
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        from rdpo_jax import sharding
        from rdpo_jax.models import config as config_lib
        from rdpo_jax.models import families, hf
        import jax.numpy as jnp
        hf_config = config()
        model = families.create(families.from_hf(hf_config), config_lib.RunSettings(param_dtype=jnp.bfloat16),
                                mesh=sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1}))
        files = hf.save_hf(model, folder, hf_config, max_shard_bytes=100 * 2**20)
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in files)
        print(f"wrote {folder}: {len(files) - 2} safetensors shards + index, {size / 2**20:.0f} MiB")
        del model
    for kind in ("jax", "torch"):
        runs = []
        for _ in range(_REPEATS.value):
            out = subprocess.run([sys.executable, __file__, f"--child={kind}", f"--workdir={_WORKDIR.value}"],
                                 check=True, capture_output=True, text=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        overhead = med["peak_anon_mib"] - med["base_mib"] - med["model_mib"]
        name = "rdpo_jax load_hf (8 CPU devices, fsdp=8)" if kind == "jax" else "transformers from_pretrained"
        print(f"{name}: median {med['seconds']:.2f}s over {len(runs)} runs "
              f"(all: {', '.join('%.2f' % r['seconds'] for r in runs)}); model {med['model_mib']:.0f} MiB; "
              f"peak anon RSS {med['peak_anon_mib']:.0f} MiB over a {med['base_mib']:.0f} MiB baseline "
              f"→ overhead beyond the model {overhead:.0f} MiB; peak file-backed RSS {med['peak_file_mib']:.0f} MiB")


if __name__ == "__main__":
    app.run(main)
