"""What a program costs, counted right under loops: matmul FLOPs from a jaxpr, collectives from optimized HLO.

XLA's `cost_analysis()` counts a while loop's body once, so a decoder whose layers are a `lax.scan` is
undercounted about L times; `matmul_flops` walks the jaxpr instead and multiplies a scan body by its
length. `collectives` reads `compiled.as_text()` and multiplies each collective by the trip counts of the
loops around it.
"""

from __future__ import annotations

import math
import re

from jax.extend import core

# ----- FLOPs from a jaxpr -----


def matmul_flops(jaxpr: core.ClosedJaxpr | core.Jaxpr) -> tuple[float, float]:
    """Matmul and convolution FLOPs of the whole program (all devices together).

    Counts 2·(output elements)·(contracted size) per `dot_general` and `conv_general_dilated`, recursing
    into every sub-jaxpr in an equation's params (jit, remat, custom_jvp/vjp — whose `call_jaxpr` is what
    runs undifferentiated; under `grad` the forward and backward appear as plain equations — and any
    unknown primitive, with multiplier 1). Special cases:

      scan        the body × `length` (× 1 in the second count);
      while       cond and body once in both counts: the trip count is not in the jaxpr;
      cond        the most expensive branch;
      shard_map   the per-device body × the devices it runs on (the sizes of `newly_manual_axes`);
      pallas_call the kernel's `cost_estimate` FLOPs where it gives one (megablox's grouped matmuls);
                  else the kernel × the grid size (a dynamic grid dimension counts 1): a block-sparse
                  kernel (splash attention) counts every block as computed, an upper bound.
      ragged_dot_general  2 · rows · contraction · output width: each row meets one group's weights.

    Returns:
      (FLOPs per execution, FLOPs with every scan body counted once). The second is what XLA's
      `cost_analysis()` counts (but for Pallas kernels, which XLA does not look into), summed over
      devices: XLA's figure is per device.
    """
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = once = 0.0
    for eqn in jaxpr.eqns:
        t, o = _eqn_flops(eqn)
        total, once = total + t, once + o
    return total, once


def _eqn_flops(eqn: core.JaxprEqn) -> tuple[float, float]:
    name, params = eqn.primitive.name, eqn.params
    if name == "dot_general":
        (lhs_contract, _), _ = params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        flops = 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
        return flops, flops
    if name == "ragged_dot_general":  # each row meets one group's weights: the work of a plain matmul
        (lhs_contract, _), _ = params["ragged_dot_dimension_numbers"].dot_dimension_numbers
        lhs = eqn.invars[0].aval.shape
        flops = 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
        if len(eqn.outvars[0].aval.shape) > len(lhs) - len(lhs_contract) + 1:  # the weights' gradient [G, K, N]
            flops /= eqn.outvars[0].aval.shape[0]  # rows contracted once each, not once per group
        return flops, flops
    if name == "pallas_call" and getattr(params.get("cost_estimate"), "flops", 0):
        flops = float(params["cost_estimate"].flops)  # the kernel's own count (megablox: the rows' work)
        return flops, flops
    if name == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape  # each output element contracts (in features / groups) × window
        out_feature_dim = params["dimension_numbers"].rhs_spec[0]
        flops = 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) / rhs[out_feature_dim]
        return flops, flops
    subs = [matmul_flops(j) for v in params.values() for j in (v if isinstance(v, (tuple, list)) else (v,))
            if isinstance(j, (core.Jaxpr, core.ClosedJaxpr))]
    if not subs:
        return 0.0, 0.0
    if name == "cond":
        return max(t for t, _ in subs), max(o for _, o in subs)
    total, once = sum(t for t, _ in subs), sum(o for _, o in subs)
    if name == "scan":
        return total * params["length"], once
    if name == "shard_map":
        devices = math.prod(params["mesh"].shape[a] for a in params["newly_manual_axes"])
        return total * devices, once * devices
    if name == "pallas_call":
        blocks = math.prod(d if isinstance(d, int) else 1 for d in params["grid_mapping"].grid)
        return total * blocks, once * blocks
    return total, once


# ----- Collectives from optimized HLO text -----

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "token": 0}
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\)\s*->.*)?\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLEES = re.compile(r"\b(body|condition|calls|to_apply|true_computation|false_computation|branch_computations)"
                      r"=(\{[^}]*\}|%?[\w.\-]+)")


def collectives(hlo_text: str) -> dict[str, dict]:
    """Collectives of an optimized HLO module (`compiled.as_text()`), by kind, counted under loops.

    Each kind in `KINDS` maps to {"count": executions per program run, "bytes": result bytes per device
    per program run, "ops": instructions in the text}. An async pair (`all-gather-start`/`-done`) counts
    once, as its base kind; so does `async-start`/`-done` around a wrapped collective, which counts where it
    is, as does one inside a fusion.
    A computation runs as often as its callers together (a while body × the loop's trip count); a
    conditional's branches each count as if taken (an upper bound). `to_apply` counts only on `call`: on a
    reduction it names the scalar reducer.

    Trip counts come from the while's `known_trip_count` backend config, else from the loop's shape as XLA
    emits a scan (condition `i < N`, i starting at a constant and the body adding a constant stride, 2 in
    the collective-matmul loops XLA:TPU writes itself: ⌈(N − i₀) / stride⌉ trips; XLA:TPU drops the
    backend config). A loop matching neither counts once and is named under "unknown_trip_counts"
    {"whiles": [...]}.

    XLA:TPU writes a reduce-scatter as a fusion `all-reduce-scatter…` of an all-reduce and the
    dynamic-slice of this device's shard, which its emitter runs as one reduce-scatter: counted as
    "reduce-scatter", with the shard's bytes.

    Bytes come from the result shape. A `-start` op's result also holds its operands: for
    `all-reduce-start` the whole result is the output; for the other kinds the output is tuple element 1
    (`all-gather-start` → (input, output), `collective-permute-start` → (input, output, context...)).
    """
    instrs: dict[str, tuple[str, str, list[str], str]] = {}  # name -> (shape, opcode, operands, attributes)
    comps: dict[str, list[str]] = {}  # computation -> its instruction names; the last is ROOT
    entry, roots, current = None, {}, None
    for line in hlo_text.splitlines():
        if not line.startswith((" ", "\t")) and not line.startswith("HloModule") and (m := _COMPUTATION.match(line)):
            current = m.group(1)
            comps[current] = []
            entry = current if line.startswith("ENTRY") else entry
        elif line.rstrip() == "}":  # a computation ends; "}}, …" continues a multi-line instruction
            current = None
        elif current is not None and (m := _INSTRUCTION.match(line)):
            instrs[m.group(1)] = _split_instruction(m.group(2))
            comps[current].append(m.group(1))
            if line.lstrip().startswith("ROOT"):
                roots[current] = m.group(1)

    callers: dict[str, list[tuple[str, int]]] = {c: [] for c in comps}  # callee -> (caller, times per call)
    unknown = []
    for comp, names in comps.items():
        for name in names:
            _, opcode, _, attrs = instrs[name]
            trips = 1
            if opcode == "while":
                try:
                    trips = _trip_count(name, instrs, roots)
                except (KeyError, IndexError, ValueError):  # a loop of another shape than the one looked for
                    trips = None
                if trips is None:
                    trips = 1
                    unknown.append(name)
            for key, value in _CALLEES.findall(attrs):
                if (key == "to_apply" and opcode != "call") or opcode in ("async-update", "async-done"):
                    continue  # a reduction's scalar reducer; the async op whose start already counted
                for callee in re.findall(r"[\w.\-]+", value.replace("%", " ")):
                    callers.setdefault(callee, []).append((comp, trips if key == "body" else 1))

    memo: dict[str, int] = {}

    def runs(comp: str) -> int:
        if comp not in memo:
            memo[comp] = 1 if comp == entry else sum(runs(c) * n for c, n in callers[comp])
        return memo[comp]

    out: dict[str, dict] = {k: {"count": 0, "bytes": 0, "ops": 0} for k in KINDS}
    for comp, names in comps.items():
        for name in names:
            shape, opcode, _, _ = instrs[name]
            kind = opcode.removesuffix("-start")
            if kind not in KINDS:
                continue
            if kind == "all-reduce" and comp.startswith("all-reduce-scatter"):  # XLA:TPU's reduce-scatter
                kind, shape = "reduce-scatter", instrs[roots[comp]][0]
            if opcode.endswith("-start") and kind != "all-reduce" and shape.startswith("("):
                shape = _top_level(shape[1:-1])[1]
            n = runs(comp)
            out[kind]["count"] += n
            out[kind]["bytes"] += n * shape_bytes(shape)
            out[kind]["ops"] += 1
    out["unknown_trip_counts"] = {"whiles": unknown}
    return out


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape, tuples summed: `bf16[64,64]{1,0:T(8,128)(2,1)}` → 8192."""
    total = 0
    for dtype, dims in re.findall(r"\b([a-z]\w*)\[([\d,]*)\]", shape):
        size = 1 if dtype.startswith("f8") else _BYTES.get(dtype)
        if size is None:
            raise ValueError(f"unknown HLO element type {dtype!r} in {shape!r}")
        total += size * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _top_level(text: str) -> list[str]:
    """`text` split at commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    return parts + [text[start:].strip()]


def _matching(text: str) -> int:
    """Index of the bracket closing the one `text` starts with."""
    depth = 0
    for i, ch in enumerate(text):
        depth += (ch in "([{") - (ch in ")]}")
        if depth == 0:
            return i
    raise ValueError(f"unbalanced: {text[:80]!r}")


def _split_instruction(rhs: str) -> tuple[str, str, list[str], str]:
    """`shape opcode(operands), attributes` → (shape, opcode, operand names or literals, attributes)."""
    if rhs.startswith("("):  # a tuple shape
        end = _matching(rhs) + 1
        shape, rest = rhs[:end], rhs[end:].lstrip()
    else:
        shape, _, rest = rhs.partition(" ")
    opcode, paren = rest[:rest.index("(")], rest.index("(")
    end = paren + _matching(rest[paren:])
    operands = [op.split()[-1].lstrip("%") for op in _top_level(rest[paren + 1:end]) if op]
    return shape, opcode.strip(), operands, rest[end + 1:]


def _trip_count(name: str, instrs: dict, roots: dict[str, str]) -> int | None:
    """A while's trip count: its `known_trip_count`, else N − i₀ for a scan-shaped loop (see `collectives`)."""
    _, _, operands, attrs = instrs[name]
    if m := re.search(r'"known_trip_count":\{"n":"(\d+)"\}', attrs):
        return int(m.group(1))
    cond, body = (re.search(rf"\b{key}=%?([\w.\-]+)", attrs) for key in ("condition", "body"))

    def source(op: str) -> tuple[str, list[str], str]:  # through copies: (opcode, operands, attributes)
        while instrs[op][1] == "copy":
            op = instrs[op][2][0]
        return instrs[op][1:]

    def constant(op: str) -> int | None:
        opcode, literal, _ = source(op)
        return int(literal[0]) if opcode == "constant" and re.fullmatch(r"-?\d+", literal[0]) else None

    def tuple_index(op: str) -> int | None:
        opcode, _, attrs = source(op)
        return int(m.group(1)) if opcode == "get-tuple-element" and (m := re.search(r"index=(\d+)", attrs)) else None

    if not (cond and body and cond.group(1) in roots and body.group(1) in roots):
        return None
    compare, step = source(roots[cond.group(1)]), source(roots[body.group(1)])
    if compare[0] != "compare" or "direction=LT" not in compare[2] or step[0] != "tuple":
        return None
    counter, limit = compare[1]
    i, init = tuple_index(counter), source(operands[0])
    if i is None or init[0] != "tuple" or (limit := constant(limit)) is None or (start := constant(init[1][i])) is None:
        return None
    add = source(step[1][i])
    if add[0] != "add" or len(add[1]) != 2:
        return None
    counter_side = [tuple_index(op) == i for op in add[1]]
    stride = constant(add[1][counter_side.index(True) ^ 1]) if any(counter_side) else None
    if stride is None or stride < 1:
        return None
    return max(-(-(limit - start) // stride), 0)
