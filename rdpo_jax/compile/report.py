"""Compiling one program for TPU chips and what is printed about it: memory per chip against HBM, matmul
FLOPs through every loop, XLA's cost-model time and the utilisation it implies, collectives."""

from __future__ import annotations

import os
import time

import jax

from rdpo_jax.compile import analysis, chips

GIB = 2 ** 30


def compile_and_measure(program, chip: chips.Chip, per_chip_hbm: float, dump: str | None = None) -> dict:
    """Compiles `program` and returns its figures per chip (see the module docstring). A program XLA
    cannot fit into HBM (RESOURCE_EXHAUSTED) is reported as not fitting, with XLA's reason."""
    n = program.mesh.devices.size
    flops = analysis.matmul_flops(program.traced.jaxpr)[0]
    out = dict(program=program.name, what=program.what, chips=n, hbm=int(per_chip_hbm * GIB), pairs=program.pairs,
               matmul_flops=flops / n, note=program.note)
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
    out.update(xla_seconds=xla_seconds, xla_bytes=float(cost.get("bytes accessed", 0.0)))
    if xla_seconds > 0 and out["xla_flops"] > 0:
        # XLA's seconds per FLOP it counts, for every FLOP the program does: its count sees a loop's body
        # once (our scanned layers and its own collective-matmul loops) and a Mosaic kernel not at all
        out["estimated_s"] = xla_seconds * flops / n / out["xla_flops"]
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
    if r.get("note"):
        lines.append(f"  {r['note']}")
    kinds = [f"{k} {v['count']}× {_gib(v['bytes'])}" for k, v in r["collectives"].items()
             if isinstance(v, dict) and v.get("count")]
    lines.append("  collectives per call and chip: " + (", ".join(kinds) or "none"))
    return "\n".join(lines)
