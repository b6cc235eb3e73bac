"""Low-rank adapters (LoRA) on a frozen base, optionally stored quantized (QLoRA).

An adapted weight W [..., in, out] computes x @ W + s · (x @ A) @ B, s = alpha / rank, with A float32
[..., in, r] (PEFT's init: uniform ±1/√in) and B float32 [..., r, out] (zeros: a fresh adapter is the base
exactly). Leading dims are kept: a scanned stack's layers and a MoE's experts each get their own adapter
(A [L, E, in, r] for stacked experts). The rank dimension is never sharded; the others follow the base
weight's logical axes, so adapters shard by the same rules.

Which modules can be adapted is said by the module class: `ADAPTABLE = {leaf: in_axis}` names its weight
leaves and where their input dimension is (`layers.Linear`: {"kernel": -2}, `layers.FusedLinear` -3,
`moe.Experts` the stacked experts). `attach` adds to each matching module, per leaf, `{leaf}_lora_a` and
`{leaf}_lora_b` (`nnx.LoRAParam`, the only trainable parameters of a LoRA run), and with `quantize` replaces
the leaf by `{leaf}_codes` and `{leaf}_scales` (`models/quant.py`). The modules' forward passes call
`weight` and `adapt`. `model.set_attributes(lora_on=False, raise_if_not_found=False)` switches every adapter
off: the DPO reference of `dpo.reference="base"` is the same frozen base in the same jitted step, at no
memory. `merge` folds adapters into plain weights (export, and loading a LoRA run for sampling).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rdpo_jax import sharding
from rdpo_jax.models import quant

# The decoder's attention, Gated DeltaNet and MLP projections, a MoE's stacked experts and a shared expert;
# not the router (`mlp/gate`), a DeltaNet's per-head β and decay inputs (`in_proj_b`, `in_proj_a`), the
# embeddings, the LM head or the vision side.
DECODER = (r"language_model/layers/(\d+/)?(self_attn/[qkvo]_proj/kernel|linear_attn/(in_proj_qkv|in_proj_z|out_proj)/kernel"
           r"|mlp/([a-z_]+/)?(gate|up|down|gate_up)_proj(/kernel)?)")
_STACKED = ("stacked_depth", "stacked_block")  # `layers.stack`'s metadata, which adapters and codes inherit
QUANTIZE_KINDS = ("", *quant.KINDS)
ADAPTER = ("_lora_a", "_lora_b")


@dataclasses.dataclass(frozen=True)
class LoRASettings:
    """A LoRA run's adapters (`config.lora`): which weights, their rank and scale, and the base's storage."""

    rank: int
    alpha: float = 16.0
    targets: tuple[str, ...] = (DECODER,)  # regexes over weight paths ("a/b/kernel"), each must match
    dropout: float = 0.0  # on the adapters' input, training steps only
    quantize: str = ""  # "" (the base in model.param_dtype) | "int8" | "nf4": the frozen base stored quantized
    quantize_targets: tuple[str, ...] = (DECODER,)  # the weights stored quantized (adapted or not)
    block: int = quant.BLOCK  # rows per quantization scale

    def __post_init__(self):
        for field, ok, message in (
                ("rank", self.rank > 0, "must be positive"),
                ("alpha", self.alpha > 0, "must be positive"),
                ("dropout", 0 <= self.dropout < 1, "must be in [0, 1)"),
                ("quantize", self.quantize in QUANTIZE_KINDS, f"{self.quantize!r} is not one of {QUANTIZE_KINDS}"),
                ("block", self.block > 0 and self.block % 2 == 0, "must be a positive even number")):
            if not ok:
                raise ValueError(f"config.lora.{field}: {message}")
        for pattern in (*self.targets, *self.quantize_targets):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"config.lora: {pattern!r} is not a regex ({e})") from None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, lora) -> LoRASettings | None:
        """A training config's `lora` section — a ConfigDict, or the dict a run's config.json holds — (None
        when `lora.rank` is 0: full fine-tuning)."""
        if not lora.get("rank"):
            return None

        def split(text):
            return tuple(p.strip() for p in text.split(",") if p.strip())

        return cls(rank=lora["rank"], alpha=lora["alpha"], targets=split(lora["targets"]) or (DECODER,),
                   dropout=lora["dropout"], quantize=lora["quantize"],
                   quantize_targets=split(lora["quantize_targets"]) or (DECODER,), block=lora["block"])


def _path(path) -> str:
    return "/".join(str(p) for p in path)


def weights(model: nnx.Module):
    """(module, leaf, "path/leaf", in_axis) of every adaptable weight of `model`."""
    for path, module in model.iter_modules():
        for leaf, in_axis in getattr(type(module), "ADAPTABLE", {}).items():
            if getattr(module, leaf, None) is not None or getattr(module, leaf + "_codes", None) is not None:
                yield module, leaf, _path((*path, leaf)), in_axis


def attach(model: nnx.Module, settings: LoRASettings, rngs) -> nnx.Module:
    """Adds adapters (and quantizes the base, with `settings.quantize`) in place; returns `model`. Works
    on concrete models and under `nnx.eval_shape` / `jax.jit` alike. A target regex that matches no
    weight is an error naming it (a typo would otherwise train or quantize nothing)."""
    found = list(weights(model))
    for field, patterns in (("targets", settings.targets),
                            ("quantize_targets", settings.quantize_targets if settings.quantize else ())):
        for pattern in patterns:
            if not any(re.fullmatch(pattern, name) for _, _, name, _ in found):
                raise ValueError(f"config.lora.{field}: {pattern!r} matches no adaptable weight (they look like "
                                 f"{found[0][2]!r})")
    adapted = [w for w in found if any(re.fullmatch(p, w[2]) for p in settings.targets)]
    if settings.dropout and any(set(type(m).ADAPTABLE) != {"kernel"} for m, *_ in adapted):
        raise ValueError("config.lora.dropout: applies to projections' adapters only, not to stacked experts': set 0 "
                         "or leave the experts out of lora.targets")
    for index, (module, leaf, name, in_axis) in enumerate(found):
        if any(re.fullmatch(p, name) for p in settings.targets):
            _add_adapter(module, leaf, in_axis, settings, rngs, index)
        if settings.quantize and any(re.fullmatch(p, name) for p in settings.quantize_targets):
            try:
                _quantize(module, leaf, in_axis, settings)
            except ValueError as e:
                raise ValueError(f"config.lora.block: {name} cannot be quantized: {e}") from None
    return model


def _add_adapter(module, leaf, in_axis, settings: LoRASettings, rngs, index: int) -> None:
    variable = getattr(module, leaf)
    w, meta = variable.get_value(), variable.get_metadata()
    shape, n = w.shape, w.ndim
    i = n + in_axis  # the input dimension
    axes = meta.get("logical_axes") or (None,) * n
    units = meta.get("shard_units") or (1,) * n
    r = settings.rank
    extra = {k: meta[k] for k in _STACKED if k in meta}
    bound = 1.0 / math.sqrt(shape[i])
    dtype = jnp.promote_types(w.dtype, jnp.float32)  # float32 master weights over a bfloat16 base (float64 in x64)
    a = jax.random.uniform(rngs.params(), (*shape[:i + 1], r), dtype, -bound, bound)
    b = jnp.zeros((*shape[:i], r, *shape[i + 1:]), dtype)
    setattr(module, leaf + "_lora_a", nnx.LoRAParam(a, logical_axes=(*axes[:i + 1], None),
                                                    shard_units=(*units[:i + 1], 1), **extra))
    setattr(module, leaf + "_lora_b", nnx.LoRAParam(b, logical_axes=(*axes[:i], None, *axes[i + 1:]),
                                                    shard_units=(*units[:i], 1, *units[i + 1:]), **extra))
    module.lora_scale, module.lora_on = settings.scale, True
    # dropout masks differ per adapted module (`lora_id`), per scanned layer and per step (`dropout_key`)
    module.lora_dropout, module.lora_id = settings.dropout, index


def _flat(shape, in_axis):
    """A weight [..., in, rest…] as [..., in, prod(rest)] (a fused projection's [in, k, out])."""
    i = len(shape) + in_axis
    return (*shape[:i + 1], math.prod(shape[i + 1:]))


def _quantize(module, leaf, in_axis, settings: LoRASettings) -> None:
    variable = getattr(module, leaf)
    w, meta = variable.get_value(), variable.get_metadata()
    i = w.ndim + in_axis
    axes = meta.get("logical_axes") or (None,) * w.ndim
    flat_axes = (*axes[:i + 1], axes[-1] if w.ndim - i == 2 else None)
    extra = {k: meta[k] for k in _STACKED if k in meta}
    codes, scales = quant.quantize(w.reshape(_flat(w.shape, in_axis)), settings.quantize, settings.block)
    setattr(module, leaf + "_codes", nnx.Param(codes, logical_axes=flat_axes, **extra))
    setattr(module, leaf + "_scales", nnx.Param(scales, logical_axes=flat_axes, **extra))
    # static: how to dequantize, and the weight's own dtype and sharding metadata (for `merge`)
    setattr(module, leaf + "_quant", (settings.quantize, tuple(w.shape[i:]), np.dtype(w.dtype).name, tuple(axes),
                                      tuple(meta.get("shard_units") or (1,) * w.ndim)))
    setattr(module, leaf, None)


# ----- forward -----

def weight(module, leaf: str, dtype) -> jax.Array:
    """The base weight `leaf` of `module` in `dtype`: the parameter, or its dequantized codes."""
    codes = getattr(module, leaf + "_codes", None)
    if codes is None:
        return getattr(module, leaf)[...].astype(dtype)
    kind, tail = getattr(module, leaf + "_quant")[:2]
    scales = getattr(module, leaf + "_scales")
    # gathered as codes (4 or 8 bits a weight), not as the dequantized weight
    codes, scales = (sharding.gathered(v[...], v.get_metadata().get("logical_axes")) for v in (codes, scales))
    w = quant.dequantize(codes, scales, kind, dtype)
    return w.reshape(*w.shape[:-2], *tail)


def adapters(module, leaf: str, dtype):
    """(A, B, scale) of `leaf` in `dtype` when it has an adapter that is on, else None."""
    a = getattr(module, leaf + "_lora_a", None)
    if a is None or not module.lora_on:
        return None
    return a[...].astype(dtype), getattr(module, leaf + "_lora_b")[...].astype(dtype), module.lora_scale


_DROPOUT_KEY = contextvars.ContextVar("lora_dropout_key", default=None)


@contextlib.contextmanager
def dropout_key(key: jax.Array | None):
    """Adapters' dropout draws from `key` inside this context (a training step's policy forward); outside
    it, or with None, adapters take their input as is."""
    token = _DROPOUT_KEY.set(key)
    try:
        yield
    finally:
        _DROPOUT_KEY.reset(token)


@contextlib.contextmanager
def fold_dropout_key(data: jax.Array):
    """Inside a scanned layer: the active dropout key folded with the layer's index (`layers.scan`)."""
    key = _DROPOUT_KEY.get()
    with dropout_key(None if key is None else jax.random.fold_in(key, data)):
        yield


def dropout(x: jax.Array, module) -> jax.Array:
    """x with inverted dropout at the module's `lora_dropout` rate when a dropout key is active."""
    key, rate = _DROPOUT_KEY.get(), module.lora_dropout
    if key is None or rate == 0:
        return x
    keep = jax.random.bernoulli(jax.random.fold_in(key, module.lora_id), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


# ----- merge -----

def merge(model: nnx.Module) -> nnx.Module:
    """`model` with every adapter folded into its weight (W + s · A @ B, in float32, stored in the weight's
    dtype) and quantized weights dequantized: plain parameters only, in place; returns `model`."""
    for module, leaf, _, in_axis in list(weights(model)):
        codes = getattr(module, leaf + "_codes", None)
        if codes is None:
            dtype, meta = getattr(module, leaf).get_value().dtype, getattr(module, leaf).get_metadata()
        else:
            _, _, dtype, axes, units = getattr(module, leaf + "_quant")
            meta = {"logical_axes": axes, "shard_units": units, **{k: v for k, v in codes.get_metadata().items()
                                                                   if k in _STACKED}}
        w = weight(module, leaf, jnp.float32)
        a = getattr(module, leaf + "_lora_a", None)
        if a is not None:
            b = getattr(module, leaf + "_lora_b")
            w = w + module.lora_scale * _product(a[...], b[...], w.ndim + in_axis, w.ndim)
            for suffix in ADAPTER:
                delattr(module, leaf + suffix)
            for name in ("lora_scale", "lora_on", "lora_dropout", "lora_id"):
                delattr(module, name)
        if codes is not None:
            for suffix in ("_codes", "_scales", "_quant"):
                delattr(module, leaf + suffix)
        setattr(module, leaf, nnx.Param(w.astype(dtype), **meta))
    return model


def _product(a: jax.Array, b: jax.Array, i: int, n: int) -> jax.Array:
    """A @ B over the rank: a [..., in, r], b [..., r, rest…] -> [..., in, rest…] (leading dims paired)."""
    lead = a.shape[:i]
    a2 = a.reshape(-1, a.shape[i], a.shape[-1])
    b2 = b.reshape(-1, b.shape[i], math.prod(b.shape[i + 1:]))
    return jnp.einsum("lir,lro->lio", a2, b2).reshape(*lead, a.shape[i], *b.shape[i + 1:])
