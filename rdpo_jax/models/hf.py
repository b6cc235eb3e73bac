"""Hugging Face checkpoints in and out: `config.json` + safetensors, in the layouts transformers reads.

Parameter names mirror transformers' module names (see each family's `model.py`); a name differs only in
its leaf (`kernel`/`scale`/`embedding` for `weight`) and in the prefix each on-disk layout uses. Each
family lists its prefixes (`Family.hf_read`: every layout we read → our canonical name, `hf_write`: the
Hub layout we write):

  LLaVA — canonical         llava-hf Hub / transformers 4.x      transformers ≥ 4.52 in memory
  language_model.X          language_model.model.X               model.language_model.X
  lm_head.X                 language_model.lm_head.X             lm_head.X
  vision_tower.X            vision_tower.vision_model.X          model.vision_tower.X (5.x: no vision_model)
  multi_modal_projector.X   multi_modal_projector.X              model.multi_modal_projector.X

  Qwen2.5-VL — canonical    Hub (and what transformers 5 saves)  transformers 5 in memory
  visual.X                  visual.X                             model.visual.X
  language_model.X          model.X                              model.language_model.X
  lm_head.X                 lm_head.X (absent when tied)         lm_head.X

We write the Hub layouts, which transformers 4.x and 5.x and vLLM load. Linear kernels are stored
[in, out] here and [out, in] by PyTorch; patch convolutions HWIO vs OIHW (2D), [C, T, P, P, out] vs
[out, C, T, P, P] (3D). A MoE's stacked experts are [E, in, out] here; on disk:

  Qwen3-VL-MoE Hub          [E, in, out]
  Qwen3.5-MoE Hub           [E, out, in] (also what transformers 5 saves of Qwen3-VL-MoE)
  transformers 5.23 saves   one [out, in] tensor per expert and projection: `experts.{e}.gate_proj.weight`,
  of Qwen3.5-MoE            `up_proj` (gate_up_proj's two halves), `down_proj`

All three are read (the stacked two told apart by shape); the family's Hub layout is written
(`Family.hf_experts`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import os
import re
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from rdpo_jax import sharding
from rdpo_jax.models import config as config_lib
from rdpo_jax.models import families, safetensors_io
from rdpo_jax.models.vlm import Family, VisionLanguageModel

_LOAD_THREADS = 4  # tensors read concurrently by load_hf; host memory holds at most this many
_LEAF_TO_HF = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
# convolution kernels, PyTorch -> ours (the output channels last): OIHW -> HWIO, [O, C, T, P, P] -> [C, T, P, P, O]
_TO_OURS = {4: (2, 3, 1, 0), 5: (1, 2, 3, 4, 0)}
# a MoE's stacked experts (`models/moe.py`), [E, in, out] here: [E, in, out] or [E, out, in] on disk, told apart
# by shape (the config refuses shapes that would be both), or per expert: the projections each leaf stacks, in
# the order they are concatenated along out
_EXPERT_LEAVES = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
_PER_EXPERT = re.compile(r"^(.+\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class CheckpointMismatchError(ValueError):
    """The tensors in a checkpoint folder do not match the model its config.json describes."""


def canonical_name(disk_name: str, family: Family) -> str:
    for pattern, repl in family.hf_read:
        disk_name = re.sub(pattern, repl, disk_name, count=1)
    return disk_name


def hf_name(path: tuple) -> str:
    """Our parameter path -> canonical transformers name (leaf renamed)."""
    *parents, leaf = (str(p) for p in path)
    return ".".join([*parents, _LEAF_TO_HF.get(leaf, leaf)])


def _is_stacked(variable: nnx.Variable) -> bool:
    """A parameter of scanned layers, stacked [L, …] by `layers.stack`."""
    return variable.get_metadata().get("stacked_depth") is not None


def hf_names(path: tuple, variable: nnx.Variable) -> list[str]:
    """The canonical transformers names of one parameter: one, or for a stacked parameter of scanned
    layers (`layers.stack`, [L, …]) one per layer, the layer number inserted where the stack sits
    (`language_model.layers.mlp.up_proj.kernel` -> `language_model.layers.{i}.mlp.up_proj.weight`)."""
    if not _is_stacked(variable):
        return [hf_name(path)]
    meta = variable.get_metadata()
    head, tail = path[:len(path) - meta["stacked_depth"]], path[len(path) - meta["stacked_depth"]:]
    if meta.get("stacked_block"):  # stacked blocks of layers: tail[0] is the layer within its block
        block = meta["stacked_block"]
        return [hf_name((*head, i * block + int(tail[0]), *tail[1:])) for i in range(variable.get_value().shape[0])]
    return [hf_name((*head, i, *tail)) for i in range(variable.get_value().shape[0])]


def _layer_shape(variable: nnx.Variable) -> tuple[int, ...]:
    """The shape of one tensor on disk's worth of `variable` (a stacked one without its layer axis)."""
    shape = tuple(variable.get_value().shape)
    return shape[1:] if _is_stacked(variable) else shape


def disk_name(canonical: str, family: Family) -> str:
    for prefix, repl in family.hf_write:
        if canonical.startswith(prefix):
            return repl + canonical[len(prefix):]
    raise ValueError(f"no on-disk prefix for {canonical!r}")


def _to_ours(path: tuple, tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A lazy view of a PyTorch-layout tensor in our layout `shape` (transposes are views: nothing is
    read). Fused projections ([k·out, in] in PyTorch) are [in, k, out] here, their biases [k, out]."""
    if path[-1] == "kernel":
        if len(shape) == 3:
            return tensor.T.reshape(shape)
        return tensor.T if tensor.ndim == 2 else tensor.transpose(*_TO_OURS[tensor.ndim])
    if _is_transposed_experts(path, tensor.shape, shape):
        return tensor.transpose(0, 2, 1)
    return tensor.reshape(shape) if tensor.ndim != len(shape) else tensor


def _is_transposed_experts(path: tuple, disk: tuple[int, ...], ours: tuple[int, ...]) -> bool:
    """Stacked expert weights on disk as transformers 5 saves them, [E, out, in]."""
    return (path[-1] in _EXPERT_LEAVES and len(ours) == 3 and tuple(disk) != tuple(ours)
            and tuple(disk) == (ours[0], ours[2], ours[1]))


class _PerExpert:
    """A lazy view, in our layout [E, in, out], of a stacked expert weight stored one PyTorch [out, in] tensor
    per expert and projection (`parts[e]`, concatenated along out): indexing with slices reads only the
    experts and input rows it selects (a multi-host load's slices)."""

    def __init__(self, parts: list[list[np.ndarray]]):
        self.parts = parts
        self.shape = (len(parts), parts[0][0].shape[1], sum(t.shape[0] for t in parts[0]))
        self.ndim, self.dtype = 3, parts[0][0].dtype

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
        experts, rows, cols = index
        return np.stack([np.concatenate([t.T[rows] for t in self.parts[e]], axis=1)[:, cols]
                         for e in range(self.shape[0])[experts]])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self[:, :, :].astype(dtype or self.dtype, copy=False)


def _per_expert(by_canonical: dict[str, str]) -> dict[str, list[list[str]]]:
    """Per-expert tensors (`….experts.{e}.gate_proj.weight`, …) gathered under the stacked weight they slice
    (`….experts.gate_up_proj`): its disk names per expert, in concatenation order. Gathered names leave
    `by_canonical`; a set that lacks some expert's projection stays there (unexpected tensors)."""
    found: dict[str, dict[tuple[int, str], str]] = {}
    for name in by_canonical:
        if m := _PER_EXPERT.match(name):
            found.setdefault(m[1], {})[int(m[2]), m[3]] = name
    stacked = {}
    for head, parts in found.items():
        num = 1 + max(e for e, _ in parts)
        for leaf, projections in _EXPERT_LEAVES.items():
            names = [[parts.get((e, proj)) for proj in projections] for e in range(num)]
            if all(all(row) for row in names):
                stacked[f"{head}.{leaf}"] = [[by_canonical.pop(n) for n in row] for row in names]
    return stacked


def _per_expert_errors(keys: list[list[str]], want: tuple[int, ...], reader) -> list[str]:
    """What keeps per-expert tensors `keys` (per expert, per projection) from stacking to our shape `want`."""
    if len(keys) != want[0]:
        return [f"{keys[0][0]} …: {len(keys)} experts, expected {want[0]}"]
    part = (want[2] // len(keys[0]), want[1])
    return [f"{k}: expected shape {part}, found {reader.shape(k)}" for row in keys for k in row
            if reader.shape(k) != part]


def _flips_experts(path: tuple, family: Family) -> bool:
    """A stacked expert weight the family's Hub holds [E, out, in] (`Family.hf_experts`)."""
    return path[-1] in _EXPERT_LEAVES and {"in_out": False, "out_in": True}[family.hf_experts]


def _to_torch(path: tuple, array: np.ndarray, family: Family | None = None) -> np.ndarray:
    if path[-1] == "kernel":
        if array.ndim == 3:
            return array.reshape(array.shape[0], -1).T
        return array.T if array.ndim == 2 else array.transpose(*np.argsort(_TO_OURS[array.ndim]))
    if family is not None and _flips_experts(path, family):
        return array.transpose(0, 2, 1)
    return array.reshape(-1) if path[-1] == "bias" else array


def _torch_shape(path: tuple, shape: tuple[int, ...], family: Family | None = None) -> tuple[int, ...]:
    """The shape `_to_torch` gives (`family`: what we write; None: the layout load_hf compares against)."""
    if path[-1] == "kernel":
        if len(shape) == 3:
            return shape[1] * shape[2], shape[0]
        return tuple(shape[::-1]) if len(shape) == 2 else tuple(shape[i] for i in np.argsort(_TO_OURS[len(shape)]))
    if family is not None and _flips_experts(path, family):
        return shape[0], shape[2], shape[1]
    return (int(np.prod(shape)),) if path[-1] == "bias" else tuple(shape)


def _params(state: nnx.State) -> Iterator[tuple[tuple, nnx.Variable]]:
    for path, variable in nnx.to_flat_state(state):
        if isinstance(variable, nnx.Param):
            yield path, variable


def fingerprint(path: str) -> str:
    """A content hash of a model folder's config.json and safetensors files: names the reference model
    whose log-likelihoods a dataset carries (`ref_fingerprint`)."""
    import hashlib

    digest = hashlib.sha256()
    names = ["config.json"] + sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    for name in names:
        digest.update(name.encode())
        with open(os.path.join(path, name), "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()[:32]


def read_hf_config(path: str):
    """`path/config.json` as transformers parses it (e.g. a `transformers.LlavaConfig`): what `save_hf`
    writes back, with the fields our architecture config does not hold (token ids, lengths)."""
    import transformers

    file = os.path.join(path, "config.json")
    if not os.path.exists(file):
        raise FileNotFoundError(f"{path}: no config.json (is this a Hugging Face model folder?)")
    with open(file) as f:
        raw = json.load(f)
    try:
        families.get(raw.get("model_type"))
    except config_lib.UnsupportedConfigError as e:
        raise config_lib.UnsupportedConfigError(f"{file}: {e}") from None
    try:
        return transformers.AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, TypeError) as e:
        raise config_lib.UnsupportedConfigError(f"{file}: transformers cannot parse it: {e}") from e


def read_config(path: str):
    """Reads `path/config.json` into the architecture config of its family.

    Architecture configs read before come from a cache (`config_cache`) keyed by the file's bytes, the
    transformers version and the code that reads them: a process that finds its config there never imports
    transformers' config classes, which import torch (2–3 s of every command's start)."""
    file = os.path.join(path, "config.json")
    key = _cache_key(file) if os.path.exists(file) else None
    if key is not None and (cached := _cached(key)) is not None:
        return cached
    hf_config = read_hf_config(path)
    try:
        cfg = families.from_hf(hf_config)
    except config_lib.UnsupportedConfigError as e:
        raise config_lib.UnsupportedConfigError(f"{file}: {e}") from None
    _keep(key, cfg)
    return cfg


def config_cache() -> str:
    """Where `read_config` keeps architecture configs: $RDPO_JAX_CACHE/configs, else
    $XDG_CACHE_HOME/rdpo_jax/configs (~/.cache by default)."""
    root = os.environ.get("RDPO_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "rdpo_jax")
    return os.path.join(root, "configs")


@functools.cache
def _reader_fingerprint() -> str:
    """The code that turns a config.json into an architecture config: every `config.py` of the models
    package and the registry, and the transformers version (read without importing it)."""
    import hashlib
    import importlib.metadata

    digest = hashlib.sha256(importlib.metadata.version("transformers").encode())
    root = os.path.dirname(config_lib.__file__)
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            if name in ("config.py", "families.py"):
                with open(os.path.join(folder, name), "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()


def _cache_key(file: str) -> str:
    import hashlib

    with open(file, "rb") as f:
        return hashlib.sha256(f.read() + _reader_fingerprint().encode()).hexdigest()


def _cached(key: str):
    import pickle

    try:
        with open(os.path.join(config_cache(), key + ".pkl"), "rb") as f:
            return pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError):
        return None  # not there, or written by other code: read the file again


def _keep(key: str | None, cfg) -> None:
    import pickle
    import tempfile

    if key is None:
        return
    try:
        os.makedirs(config_cache(), exist_ok=True)
        with tempfile.NamedTemporaryFile("wb", dir=config_cache(), delete=False) as f:
            pickle.dump(cfg, f)
        os.replace(f.name, os.path.join(config_cache(), key + ".pkl"))  # whole or not at all, whoever races
    except OSError:
        pass  # a read-only home: no cache


def load_hf(path: str, run: config_lib.RunSettings = config_lib.RunSettings(), *,
            mesh: jax.sharding.Mesh | None = None) -> tuple[VisionLanguageModel, object]:
    """Loads a Hugging Face model folder of a supported family, tensor by tensor, straight into the target
    shardings.

    Files are memory-mapped and read a few tensors at a time: host memory holds at most
    `_LOAD_THREADS` tensors (on a multi-host mesh, only this host's slices of them), never the model; a
    stacked parameter of scanned layers is filled on its devices layer by layer, so whatever the depth
    what is in flight is one layer's tensor per thread.

    Args:
      path: folder with `config.json` and `model.safetensors` or sharded files + index.
      run: parameter and compute dtypes, remat, the placeholder check, adapters (`RunSettings`; with
        `run.lora`, the adapters are attached to the loaded base: `families.adapt`).
      mesh: place parameters by their logical axes on this mesh; None = the first local device.

    Returns:
      (model, model_config).

    Raises:
      CheckpointMismatchError: missing, unexpected or misshapen tensors (all listed by name).
      UnsupportedConfigError: a config field names an architecture or option not implemented.
    """
    cfg = read_config(path)
    family = families.of(cfg)
    graphdef, state = nnx.split(families.abstract_model(cfg, dataclasses.replace(run, lora=None)))
    reader = safetensors_io.Reader(path)

    by_canonical: dict[str, str] = {}
    for key in reader.keys():
        if family.hf_skip and re.search(family.hf_skip, key):
            continue
        name = canonical_name(key, family)
        if name in by_canonical:
            raise CheckpointMismatchError(f"{path}: {key!r} and {by_canonical[name]!r} are the same tensor")
        by_canonical[name] = key
    per_expert = _per_expert(by_canonical)
    if both := sorted(per_expert.keys() & by_canonical.keys()):
        raise CheckpointMismatchError(f"{path}: {by_canonical[both[0]]!r} is stored both stacked and per expert")

    params = list(_params(state))
    names = {p: hf_names(p, v) for p, v in params}
    wanted = {n for ns in names.values() for n in ns}
    missing = sorted(disk_name(n, family) for ns in names.values() for n in ns
                     if n not in by_canonical and n not in per_expert)
    ignored = {"lm_head.weight"} if cfg.tie_word_embeddings else set()  # a tied head may be stored too
    unexpected = sorted([by_canonical[n] for n in by_canonical if n not in wanted and n not in ignored]
                        + [k for n, rows in per_expert.items() if n not in wanted for row in rows for k in row])
    bad_shapes = []
    for p, v in params:
        want = _torch_shape(p, _layer_shape(v))
        for name in names[p]:
            if name in per_expert:
                bad_shapes += _per_expert_errors(per_expert[name], want, reader)
                continue
            got = reader.shape(by_canonical[name]) if name in by_canonical else want
            if got != want and not _is_transposed_experts(p, got, want):
                bad_shapes.append(f"{by_canonical[name]}: expected shape {want}, found {got}")
    if missing or unexpected or bad_shapes:
        raise CheckpointMismatchError(_mismatch_message(path, missing, unexpected, bad_shapes))

    one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    x64 = jax.config.x64_enabled  # a thread-local setting: carry it into the worker threads

    def view(p, name, shape):
        if name in per_expert:
            return _PerExpert([[reader.get(k) for k in row] for row in per_expert[name]])
        return _to_ours(p, reader.get(by_canonical[name]), shape)

    def load(item):
        p, variable = item
        abstract = variable.get_value()
        views = [view(p, n, _layer_shape(variable)) for n in names[p]]
        target = one_device if mesh is None else sharding.variable_sharding(variable, mesh)
        with jax.enable_x64(x64):
            if _is_stacked(variable):
                return _stack_on_devices(views, abstract.shape, abstract.dtype, target)
            return _make_array(views[0], abstract.shape, abstract.dtype, target)

    # A few tensors in flight overlap file reads, transposes and transfers (numpy and PjRt release the GIL).
    with concurrent.futures.ThreadPoolExecutor(max_workers=_LOAD_THREADS) as pool:
        for (_, variable), array in zip(params, pool.map(load, params)):
            variable.set_value(array)
    model = nnx.merge(graphdef, state)
    return (model if run.lora is None else families.adapt(model, run.lora)), cfg


def _make_array(view: np.ndarray, shape, dtype, target: jax.sharding.Sharding) -> jax.Array:
    """One parameter from a lazy file view. On one host the tensor is read once, sequentially, and
    scattered to its devices; on a multi-host mesh each host reads only the slices its devices hold."""
    if target.is_fully_addressable:
        return jax.device_put(np.ascontiguousarray(view, dtype=dtype), target)
    cache: dict = {}  # devices holding replicas ask for the same slice; read it once

    def shard(index):
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in cache:
            cache[key] = np.ascontiguousarray(view[index], dtype=dtype)
        return cache[key]

    return jax.make_array_from_callback(shape, target, shard)


def _stack_on_devices(views: list[np.ndarray], shape, dtype, target: jax.sharding.Sharding) -> jax.Array:
    """A stacked parameter [L, …] (`layers.stack`) filled on its devices one layer at a time from the
    layers' lazy file views: host memory holds one layer's tensor (this host's slices of it) at a time,
    never the stack, so what loading holds beyond the model does not grow with depth."""
    if isinstance(target, jax.sharding.NamedSharding):
        layer_target = jax.sharding.NamedSharding(target.mesh, jax.sharding.PartitionSpec(*target.spec[1:]))
    else:
        layer_target = target
    stacked = jnp.zeros(shape, dtype, device=target)
    for i, view in enumerate(views):
        stacked = _put_layer(stacked, _make_array(view, shape[1:], dtype, layer_target), i)
        stacked.block_until_ready()  # the layer's host and device copies are freed before the next is read
    return stacked


@functools.partial(jax.jit, donate_argnums=0)
def _put_layer(stacked: jax.Array, layer: jax.Array, i) -> jax.Array:
    """stacked[i] = layer, in place (the stack is donated: no second copy of it exists)."""
    return jax.lax.dynamic_update_index_in_dim(stacked, layer, i, 0)


def _mismatch_message(path, missing, unexpected, bad_shapes, limit=20) -> str:
    parts = [f"{path}: the safetensors do not match config.json"]
    for title, items in (("missing tensors", missing), ("unexpected tensors", unexpected),
                         ("wrong shapes", bad_shapes)):
        if items:
            more = f" … and {len(items) - limit} more" if len(items) > limit else ""
            parts.append(f"{title} ({len(items)}): " + ", ".join(items[:limit]) + more)
    return "\n  ".join(parts)


def save_hf(model: VisionLanguageModel, path: str, hf_config, *, dtype=None, max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Writes `config.json` and safetensors (sharded + index above `max_shard_bytes`) that
    transformers' `from_pretrained` of the family's class loads with no missing/unexpected keys.

    `hf_config` is the transformers config the model was read from (`read_hf_config`), or the folder
    holding it; it must describe `model`'s architecture. `dtype`: on disk (default: the parameters'; a
    parameter made with `keep_dtype`, such as a DeltaNet's float32 `A_log`, keeps its own, as the Hub's
    files do).

    Tensors are gathered and written one at a time. On multi-host runs every process must call this
    (gathers are collective); only process 0 writes. Returns the file names written.
    """
    if isinstance(hf_config, str):
        hf_config = read_hf_config(hf_config)
    if families.from_hf(hf_config) != model.config:
        raise ValueError("save_hf: hf_config describes another architecture than the model")
    dtype = np.dtype(model.run.param_dtype if dtype is None else dtype)
    family = families.of(model)
    specs = []
    for p, variable in _params(nnx.state(model)):
        array, names = variable.get_value(), hf_names(p, variable)
        stacked = _is_stacked(variable)
        on_disk = np.dtype(array.dtype) if variable.get_metadata().get("keep_dtype") else dtype

        def value(p=p, array=array, layer=None, on_disk=on_disk):
            part = array if layer is None else array[layer]  # a scanned layer's slice (all processes slice)
            if part.is_fully_addressable:
                host = np.asarray(jax.device_get(part))
            else:
                host = np.asarray(multihost_utils.process_allgather(part, tiled=True))
            return _to_torch(p, host.astype(on_disk), family)

        shape = _torch_shape(p, _layer_shape(variable), family)
        for i, name in enumerate(names):
            specs.append(safetensors_io.TensorSpec(disk_name(name, family), on_disk, shape,
                                                   functools.partial(value, layer=i if stacked else None)))
    specs.sort(key=lambda s: s.name)
    if jax.process_index() != 0:
        for s in specs:
            s.value()
        return []
    os.makedirs(path, exist_ok=True)
    hf = hf_config.__class__.from_dict(hf_config.to_dict())
    hf.architectures = [family.architecture]
    hf.dtype = dtype.name
    hf.text_config.dtype = dtype.name
    hf.vision_config.dtype = dtype.name
    hf.save_pretrained(path)
    return ["config.json"] + safetensors_io.write(path, specs, max_shard_bytes=max_shard_bytes)
