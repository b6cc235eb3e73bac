"""Compiles every program of a run for a TPU slice, on any machine, and says whether it fits.

    python -m rdpo_jax.compile --config=configs/NAME.py[:ARG] --topology=v5p-64 [--num_slices=N]
        [--config.FIELD=VALUE …] [--programs=train,eval,ref_logps,sample] [--all_buckets] [--json=FILE]

The same `--config` (and overrides) as `rdpo_jax.train`; the model folder needs only its `config.json`
(no weights, no data, no TPU: `libtpu` compiles for the named chips on this host's CPU). For each
program (`programs.py`) it prints, per chip: XLA's memory analysis (arguments, outputs, temporaries,
generated code) and their total against the chip's HBM, fits or not with the headroom (a program XLA
cannot fit at all is reported with XLA's reason); the matmul FLOPs of one call counted through every loop
(`analysis.matmul_flops`: XLA's own count sees a scanned layer stack's body once); XLA's cost-model time
for the call — its seconds per FLOP it counts, applied to every FLOP the call does — and the model-FLOPs
utilisation that implies: an estimate of the compiler's cost model, not a measurement; the collectives
by kind with their bytes, counted through loops. Exits 1 when a program does not fit.

GPUs have no compile without the device in JAX: `benchmarks/gpu_check.sh` measures on one.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

from rdpo_jax import train
from rdpo_jax.compile import chips, programs, report

_CONFIG = train.CONFIG  # the trainer's --config flag: the same file and overrides
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice: v5p-64, v5litepod-256, v6e-64, v4-32, or a chip grid "
                                "such as v5p:4x4x2.", required=True)
_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices of that topology (Multislice: data spans them).")
_PROGRAMS = flags.DEFINE_list("programs", "train,eval,ref_logps,sample", "Programs to compile.")
_ALL = flags.DEFINE_bool("all_buckets", False, "Every (row, patch) bucket and packed row count, not only each row "
                         "bucket with the largest patch buffer (the most memory each takes).")
_KIND = flags.DEFINE_enum("data_kind", "auto", ["auto", "pairs", "groups"], "Training records (auto: groups for "
                          "multi_answer rows, else pairs).")
_SAMPLE = flags.DEFINE_integer("sample_prompts", 8, "Prompts per generate call (data_prep.sample --batch_size).")
_SAMPLE_N = flags.DEFINE_integer("sample_n", 4, "Samples per prompt (data_prep.sample --n).")
_JSON = flags.DEFINE_string("json", None, "Also write the figures as JSON to this file.")
_DUMP = flags.DEFINE_string("dump", None, "Write each compiled program's optimized HLO text into this folder.")

def main(argv):
    del argv
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required")
    unknown = set(_PROGRAMS.value) - set(programs.PROGRAMS)
    if unknown:
        raise app.UsageError(f"--programs: unknown {sorted(unknown)}")
    try:
        topology, chip, devices = chips.devices(_TOPOLOGY.value, _SLICES.value)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    per_chip = len(devices) // (chips.chips_in(topology) * _SLICES.value)  # devices per chip (1 but on v4)
    hosts = programs.hosts(devices)
    slices = f" × {_SLICES.value} slices" if _SLICES.value > 1 else ""
    print(f"{_TOPOLOGY.value} = {topology}{slices}: {len(devices)} {devices[0].device_kind} devices on {hosts} hosts, "
          f"{chip.hbm_gib / per_chip:g} GiB HBM and {chip.bf16_tflops / per_chip:g} bf16 TFLOP/s each", flush=True)
    built = programs.build(config, devices, names=_PROGRAMS.value, all_buckets=_ALL.value,
                           kind=_KIND.value, sample_prompts=_SAMPLE.value, sample_n=_SAMPLE_N.value)
    results = []
    for program in built:
        results.append(report.compile_and_measure(program, chip, chip.hbm_gib / per_chip, _DUMP.value))
        print(report.describe(results[-1], chip), flush=True)
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(dict(topology=topology, slices=_SLICES.value, chip=chip.name, programs=results), f, indent=1)
    over = [f"{r['program']} ({r['what']})" for r in results if not r["fits"]]
    if over:
        print(f"does not fit {_TOPOLOGY.value}: {'; '.join(over)}", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
