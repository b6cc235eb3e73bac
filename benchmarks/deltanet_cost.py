"""One hybrid layer's parts compiled by XLA:TPU for one chip: the Gated DeltaNet mixer against the gated
attention mixer and the MLP of the same model, forward + backward, and what the DeltaNet's program is made of.

    python benchmarks/deltanet_cost.py [--preset=qwen3.5-27b] [--rows=2] [--tokens=3072] [--chip=v5p]
        [--unroll] [--parts=deltanet,attention,mlp] [--dump=DIR]

Each part takes bf16[rows, tokens, D] (the layer norm's output), fp32 parameters computed in bf16 as
training runs them, and returns the gradient of its summed output with respect to its parameters and its
input. Rows are plain causal rows; the DeltaNet's `Lineage` is an input (the decoder reads it once per
forward for every layer). Attention runs the einsum path (`attention="xla"`): XLA's cost model cannot look
into the splash kernel training uses on TPU. Printed per part: the matmul FLOPs through every loop
(`analysis.matmul_flops`, triangular solves not included) and those of the triangular solves
(C² · width per solve, the forward substitution's multiply-adds), XLA's own count and its time (its cost
model; a loop's body once; +1 s per triangular inversion, which it prices at −1 s), HBM bytes it expects,
the memory analysis, and for the DeltaNet what its program is made of (loops, scatters, custom calls) and
its largest float32 arrays.
`--unroll` unrolls the chunk scan (a benchmark-only patch of `jax.lax.scan`), so that XLA's time counts
every chunk.
"""

from __future__ import annotations

import collections
import math
import os
import re

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx
from jax.extend import core

from rdpo_jax import sharding
from rdpo_jax.compile import analysis, chips
from rdpo_jax.models import deltanet, families, layers, text
import presets  # benchmarks/presets.py

_PRESET = flags.DEFINE_string("preset", "qwen3.5-27b", "A Qwen3.5 preset of presets.py.")
_ROWS = flags.DEFINE_integer("rows", 2, "Rows per call.")
_TOKENS = flags.DEFINE_integer("tokens", 3072, "Tokens per row.")
_CHIP = flags.DEFINE_string("chip", "v5p", "TPU generation (one chip of its smallest slice).")
_UNROLL = flags.DEFINE_bool("unroll", False, "Unroll the DeltaNet's chunk scan (XLA's time then sees every chunk).")
_DUMP = flags.DEFINE_string("dump", None, "Write each part's optimized HLO into this folder.")
_PARTS = flags.DEFINE_list("parts", "deltanet,attention,mlp", "Parts to compile.")

GIB = 2 ** 30
# What `triangular_solve` compiles to on TPU (one inversion of the 64×64 diagonal blocks, then matmuls); XLA's
# cost model prices each such call at −1 s (a lone [64, 64] solve: −1000.00 ms), so it is added back
INVERT, INVERT_S = "InvertDiagBlocksLowerTriangular", 1.0


def parts(cfg, B: int, T: int):
    """name -> (module, its call on (module, h, aux), aux as ShapeDtypeStructs) for one layer's three parts."""
    kw = dict(param_dtype=jnp.float32, dtype=jnp.bfloat16, rngs=layers.InitKeys(jax.random.key(0)))
    mask = jax.ShapeDtypeStruct((B, T, T), jnp.bool_)
    lin = jax.eval_shape(lambda m: deltanet.lineage(m, cfg.deltanet.conv_kernel), mask)
    inv_freq, scale = layers.rope_inv_freq(cfg.rotary_dim, dict(cfg.rope))
    rope = jax.eval_shape(lambda p: layers.rope_cos_sin(p, tuple(inv_freq.tolist()), scale, jnp.bfloat16,
                                                        layers.mrope_rows(cfg.mrope_section, interleaved=True)),
                          jax.ShapeDtypeStruct((B, 3, T), jnp.int32))
    return {
        "deltanet": (lambda: deltanet.GatedDeltaNet(cfg.hidden_size, cfg.deltanet, cfg.rms_norm_eps, **kw),
                     lambda m, h, lin: m(h, lin), lin),
        "attention": (lambda: text.Attention(cfg, attention="xla", gated=True, zero_centred=True, **kw),
                      lambda m, h, a: m(h, a[0], *a[1]), (mask, rope)),
        "mlp": (lambda: layers.MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=False, **kw),
                lambda m, h, aux: m(h), ()),
    }


def solve_flops(jaxpr) -> float:
    """Multiply-add FLOPs of every `triangular_solve` (C² · columns · batch per solve), through scans."""
    total = 0.0
    for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
        if eqn.primitive.name == "triangular_solve":
            a, b = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
            total += float(a[-1]) ** 2 * math.prod(b) / b[-2]
        subs = [j for v in eqn.params.values() for j in (v if isinstance(v, (tuple, list)) else (v,))
                if isinstance(j, (core.Jaxpr, core.ClosedJaxpr))]
        total += sum(solve_flops(j) for j in subs) * eqn.params.get("length", 1)
    return total


def program_parts(hlo: str) -> dict[str, int]:
    """Counts of what optimized HLO is made of: while loops, scatters and each custom call's target."""
    counts = collections.Counter(re.findall(r'custom_call_target="(\w+)"', hlo))
    return dict(counts, whiles=hlo.count(" while("), scatters=hlo.count(" scatter("))


def largest_f32(hlo: str, n: int = 6) -> list[tuple[str, float]]:
    """The `n` largest float32 array shapes defined in optimized HLO, with their MiB."""
    sizes = {}
    for shape in re.findall(r"\bf32\[([\d,]+)\]", hlo):
        dims = tuple(int(d) for d in shape.split(","))
        sizes[dims] = math.prod(dims) * 4 / 2 ** 20
    return sorted(((f"f32[{','.join(map(str, d))}]", s) for d, s in sizes.items()), key=lambda x: -x[1])[:n]


def measure(name, build, call, aux, devices, B, T, D):
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}, devices=devices[:1])
    graphdef, params = nnx.split(nnx.eval_shape(build))
    on = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on)  # noqa: E731
    params = jax.tree.map(spec, nnx.to_pure_dict(params))
    h = jax.ShapeDtypeStruct((B, T, D), jnp.bfloat16, sharding=on)
    aux = jax.tree.map(spec, aux)

    def loss(params, h, aux):
        module = nnx.merge(graphdef, nnx.State(params))
        return jnp.sum(call(module, h, aux).astype(jnp.float32))

    step = jax.jit(sharding.traced_on(mesh, jax.grad(loss, argnums=(0, 1))))
    traced = step.trace(params, h, aux)
    flops = analysis.matmul_flops(traced.jaxpr)[0]
    solves = solve_flops(traced.jaxpr)
    compiled = traced.lower().compile()
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    m = compiled.memory_analysis()
    hlo = compiled.as_text()
    if _DUMP.value:
        os.makedirs(_DUMP.value, exist_ok=True)
        with open(os.path.join(_DUMP.value, f"{name}.hlo.txt"), "w") as f:
            f.write(hlo)
    ops = program_parts(hlo)
    xla_s = float(cost.get("optimal_seconds", 0))
    r = dict(name=name, matmul=flops, solves=solves, xla_flops=float(cost.get("flops", 0)), xla_s=xla_s,
             fixed_s=xla_s + INVERT_S * ops.get(INVERT, 0), xla_bytes=float(cost.get("bytes accessed", 0)),
             temp=m.temp_size_in_bytes, args=m.argument_size_in_bytes, out=m.output_size_in_bytes)
    print(f"## {name}: matmul {flops / 1e12:.3f} TFLOP through loops, triangular solves {solves / 1e12:.3f} TFLOP; "
          f"XLA: {r['xla_flops'] / 1e12:.3f} TFLOP, {r['xla_bytes'] / GIB:.2f} GiB accessed, {r['xla_s'] * 1e3:.2f} ms "
          f"({r['fixed_s'] * 1e3:.2f} ms with {ops.get(INVERT, 0)} × 1 s added back); "
          f"memory: arguments {r['args'] / GIB:.2f} GiB, outputs {r['out'] / GIB:.2f} GiB, "
          f"temporaries {r['temp'] / GIB:.2f} GiB", flush=True)
    if name == "deltanet":
        print(f"  program: {ops}")
        print("  largest f32 arrays: " + ", ".join(f"{s} {mib:.0f} MiB" for s, mib in largest_f32(hlo)))
    return r


def main(argv):
    del argv
    if _UNROLL.value:  # every chunk visible to XLA's cost analysis (benchmark only)
        scan = jax.lax.scan
        jax.lax.scan = lambda f, init, xs, **kw: scan(f, init, xs, **{**kw, "unroll": True})
    _, _, devices = chips.devices(f"{_CHIP.value}-{chips.CHIPS[_CHIP.value].cores_per_chip * 4}")
    cfg = families.from_hf(presets.hf_config(_PRESET.value)).text
    B, T, D = _ROWS.value, _TOKENS.value, cfg.hidden_size
    print(f"{_PRESET.value}: one {devices[0].device_kind} chip, {B} rows × {T} tokens, bf16 compute, fp32 "
          f"parameters; forward + backward of each part", flush=True)
    rows = [measure(name, *spec, devices, B, T, D) for name, spec in parts(cfg, B, T).items() if name in _PARTS.value]
    print("\n| part | matmul TFLOP | + solves | XLA TFLOP | XLA ms (+1 s per inversion) | XLA GiB accessed | "
          "temporaries GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['matmul'] / 1e12:.3f} | {r['solves'] / 1e12:.3f} | {r['xla_flops'] / 1e12:.3f} | "
              f"{r['fixed_s'] * 1e3:.2f} | {r['xla_bytes'] / GIB:.2f} | {r['temp'] / GIB:.2f} |")


if __name__ == "__main__":
    app.run(main)
