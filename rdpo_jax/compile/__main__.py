"""Compiles every program of a run for a TPU slice, on any machine, and says whether it fits.

    python -m rdpo_jax.compile --config=rdpo_jax/configs/NAME.py[:ARG] --topology=v5p-64 [--num_slices=N]
        [--config.FIELD=VALUE …] [--programs=train,eval,ref_logps,sample] [--all_buckets] [--json=FILE]

The same `--config` (and overrides) as `rdpo_jax.train`; the model folder needs only its `config.json`
(no weights, no data, no TPU: `libtpu` compiles for the named chips on this host's CPU). For each
program (`programs.py`) it prints, per chip: XLA's memory analysis (arguments, outputs, temporaries,
generated code) and their total against the chip's HBM, fits or not with the headroom; the matmul FLOPs
of one call counted through every loop (`analysis.matmul_flops`: XLA's own count sees a scanned layer
stack's body once); XLA's cost-model time for the call, scaled by the same ratio, and the model-FLOPs
utilisation it implies — an estimate of the compiler's cost model, not a measurement; the collectives
by kind with their bytes, counted through loops. Exits 1 when a program does not fit.

GPUs have no compile without the device in JAX: `benchmarks/gpu_check.sh` measures on one.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
from absl import app, flags

from rdpo_jax import train
from rdpo_jax.compile import analysis, chips, programs

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

GIB = 2 ** 30


def report(program, chip: chips.Chip, per_chip_hbm: float, dump: str | None = None) -> dict:
    """Compiles `program` and returns its figures per chip (see the module docstring). A program XLA
    cannot fit into HBM (RESOURCE_EXHAUSTED) is reported as not fitting, with XLA's reason."""
    n = program.mesh.devices.size
    flops, flops_once = analysis.matmul_flops(program.traced.jaxpr)
    out = dict(program=program.name, what=program.what, chips=n, hbm=int(per_chip_hbm * GIB), pairs=program.pairs,
               matmul_flops=flops / n)
    t0 = time.perf_counter()
    try:
        compiled = program.traced.lower().compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        reason = str(e).split("RESOURCE_EXHAUSTED:", 1)[1].strip().splitlines()[0]
        return out | dict(compile_s=round(time.perf_counter() - t0, 1), fits=False, error=reason)
    out["compile_s"] = round(time.perf_counter() - t0, 1)
    m = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    text = compiled.as_text()
    if dump:
        os.makedirs(dump, exist_ok=True)
        with open(os.path.join(dump, f"{program.name}.{len(os.listdir(dump))}.hlo.txt"), "w") as f:
            f.write(text)
    total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
             + m.generated_code_size_in_bytes)
    model_flops = analysis.matmul_flops(program.model().jaxpr)[0] if program.model else flops
    out.update(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes, aliased=m.alias_size_in_bytes,
               temporaries=m.temp_size_in_bytes, code=m.generated_code_size_in_bytes, total=total,
               fits=total <= out["hbm"], model_flops=model_flops / n, xla_flops=float(cost.get("flops", 0.0)),
               mosaic_kernels=text.count('custom_call_target="tpu_custom_call"'), collectives=analysis.collectives(text))
    xla_seconds = float(cost.get("optimal_seconds", 0.0))
    if xla_seconds > 0 and flops_once > 0:
        out["estimated_s"] = xla_seconds * flops / flops_once
        out["mfu"] = out["model_flops"] / (out["estimated_s"] * chip.bf16_tflops * 1e12)
    return out


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def _flops(n: float) -> str:
    return f"{n / 1e12:.2f} TFLOP" if n >= 1e11 else f"{n / 1e9:.3f} GFLOP"


def describe(r: dict, chip: chips.Chip) -> str:
    head = f"{r['program']}: {r['what']}, {r['chips']} chips, compiled in {r['compile_s']:.1f}s"
    if "error" in r:
        return f"{head}\n  DOES NOT FIT: XLA says {r['error']}"
    free = r["hbm"] - r["total"]
    verdict = f"fits ({_gib(free)} free)" if r["fits"] else f"DOES NOT FIT ({_gib(-free)} over)"
    lines = [head + (f", {r['mosaic_kernels']} Mosaic kernels" if r["mosaic_kernels"] else ""),
             f"  memory per chip: arguments {_gib(r['arguments'])}, outputs {_gib(r['outputs'])} "
             f"({_gib(r['aliased'])} aliased), temporaries {_gib(r['temporaries'])}, code {_gib(r['code'])}: "
             f"{_gib(r['total'])} of {_gib(r['hbm'])} HBM, {verdict}",
             f"  matmul FLOPs per call and chip: {_flops(r['matmul_flops'])} through every loop, "
             f"{_flops(r['model_flops'])} without remat (XLA's own count, loop bodies once: {_flops(r['xla_flops'])})"]
    if "estimated_s" in r:
        rate = f", {r['pairs'] / r['estimated_s']:.1f} pairs/s" if r["pairs"] else ""
        lines.append(f"  estimated time per call (XLA's cost model, not a measurement): {r['estimated_s'] * 1e3:.1f} ms"
                     f"{rate}; model-FLOPs utilisation {100 * r['mfu']:.0f}% of {chip.bf16_tflops:.0f} TFLOP/s")
    kinds = [f"{k} {v['count']}× {_gib(v['bytes'])}" for k, v in r["collectives"].items()
             if isinstance(v, dict) and v.get("count")]
    lines.append("  collectives per call and chip: " + (", ".join(kinds) or "none"))
    return "\n".join(lines)


def main(argv):
    del argv
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required")
    try:
        topology, chip = chips.topology(_TOPOLOGY.value)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    unknown = set(_PROGRAMS.value) - set(programs.PROGRAMS)
    if unknown:
        raise app.UsageError(f"--programs: unknown {sorted(unknown)}")
    for name, value in chips.libtpu_env(topology).items():
        os.environ.setdefault(name, value)
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(topology_name=topology, platform="tpu", num_slices=_SLICES.value).devices
    per_chip = len(devices) // (chips.chips_in(topology) * _SLICES.value)  # devices per chip (1 but on v4)
    hosts = len({(getattr(d, "slice_index", 0), d.process_index) for d in devices})
    slices = f" × {_SLICES.value} slices" if _SLICES.value > 1 else ""
    print(f"{_TOPOLOGY.value} = {topology}{slices}: {len(devices)} {devices[0].device_kind} devices on {hosts} hosts, "
          f"{chip.hbm_gib / per_chip:g} GiB HBM and {chip.bf16_tflops / per_chip:g} bf16 TFLOP/s each", flush=True)
    built = programs.build(config, devices, hosts=hosts, names=_PROGRAMS.value, all_buckets=_ALL.value,
                           kind=_KIND.value, sample_prompts=_SAMPLE.value, sample_n=_SAMPLE_N.value)
    results = []
    for program in built:
        results.append(report(program, chip, chip.hbm_gib / per_chip, _DUMP.value))
        print(describe(results[-1], chip), flush=True)
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(dict(topology=topology, slices=_SLICES.value, chip=chip.name, programs=results), f, indent=1)
    over = [f"{r['program']} ({r['what']})" for r in results if not r["fits"]]
    if over:
        print(f"does not fit {_TOPOLOGY.value}: {'; '.join(over)}", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
