"""Every program a run executes, built from its config alone: abstract state (shapes and shardings, no
weights), abstract batches (shapes, no data), jitted as the commands jit them.

  train      the train step for each row bucket (with the largest patch buffer; every (row, patch)
             bucket and every packed row count with `all_buckets`), on the run's mesh
  eval       the held-out step at the longest bucket (when `data.eval` is set)
  ref_logps  `data_prep.ref_logps`' forward at the longest bucket: one host's chips, `data.batch_size`
             records per call
  sample     `data_prep.sample`'s `generate` (prefill and the decode loop): one host's chips, prompts as
             long as the longest bucket leaves room for after an answer, `data.max_answer_len` new tokens

A batch's shapes come from the data pipeline's own collation of padding records (`pipeline.Collate`),
stretched to each bucket, so the programs are the ones the pipeline's batches select.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rdpo_jax import config_checks, inference, logps, sampling, sharding, train, train_step
from rdpo_jax.batch import Batch, pad_patches
from rdpo_jax.data import pipeline
from rdpo_jax.models import config as config_lib
from rdpo_jax.models import families, image_inputs

PROGRAMS = ("train", "eval", "ref_logps", "sample")


@dataclasses.dataclass
class Program:
    name: str  # "train", "eval", …
    what: str  # its shapes, in words
    mesh: jax.sharding.Mesh
    traced: Any  # `jax.jit(...).trace(*abstract args)`: its jaxpr and its lowering
    model: Callable[[], Any] | None = None  # the same program without remat, traced (model FLOPs), or None
    pairs: int = 0  # preference pairs (or SFT examples) a call trains on at most
    note: str = ""  # what the figures of a call cover, where that is not the whole call


def _host(device) -> tuple[int, int]:
    return getattr(device, "slice_index", 0), device.process_index


def hosts(devices) -> int:
    """The processes (one per host, of every slice) that run on `devices`."""
    return len({_host(d) for d in devices})


def host_mesh(config, devices) -> jax.sharding.Mesh:
    """The mesh of a one-host command (ref_logps, sample) on the first host's chips, as those commands make
    it (`inference.local_mesh`: the config's mesh if it fits them, else FSDP over them)."""
    return inference.local_mesh(dict(config.mesh), devices=[d for d in devices if _host(d) == _host(devices[0])])


def image_input(config, model_config):
    """The run's image adapter; without the model folder's processor config, one that has the
    architecture's image shapes (all a compile needs: padding rows carry no pixels)."""
    try:
        return image_inputs.from_config(config, model_config)
    except FileNotFoundError:
        d = config.data
        return image_inputs.for_model(model_config, None, max_images=d.max_images, max_pixels=d.max_pixels,
                                      patch_buckets=tuple(d.patch_buckets))


def _abstract(batch: Batch, mesh) -> Batch:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), batch, batch.shardings(mesh))


def _buckets(config, options, collate, kind: str, all_buckets: bool) -> list[tuple[int, int, int, int]]:
    """(rows per host, row length, trained tokens per row, patches) of every train program."""
    local = collate([])["batch"]
    rows = [len(local.valid)]
    if options.groups_per_row > 1 and all_buckets:  # packed rows: ⌈B/k⌉, 2⌈B/k⌉, … B
        B, k = collate.batch_size, options.groups_per_row
        rows = sorted({min(B, -(-B // k) * j) for j in range(1, k + 1)})
    patches = [0]
    if "patches" in local.images:
        patches = list(config.data.patch_buckets) if all_buckets else [max(config.data.patch_buckets)]
    return [(r, t, options.target_width(t, kind), p) for r in rows for t in config.data.seq_buckets for p in patches]


def build(config, devices, *, names=PROGRAMS, all_buckets: bool = False, kind: str = "auto",
          sample_prompts: int = 8, sample_n: int = 4) -> list[Program]:
    """The programs `names` of the run `config` on `devices` (one process per host), traced (not lowered).

    `kind`: the training data's records, "pairs" or "groups" ("auto": groups for multi_answer rows,
    pairs otherwise; SFT reads sft)."""
    processes = hosts(devices)
    mesh = sharding.make_mesh(config_checks.validate(config, num_devices=len(devices), num_processes=processes),
                              devices=devices)
    setup = train.Setup(config, mesh)
    options = pipeline.Options.from_config(config,
                                           reference_fingerprint="abstract" if setup.precomputed_reference else None)
    if kind == "auto":
        kind = options.kind if options.kind == "sft" else ("groups" if options.pair_layout == "multi_answer"
                                                           else "pairs")
    vision = image_input(config, setup.model_config)
    collate = pipeline.Collate(options, config.data.batch_size // processes, 0, vision, kind)
    local = collate([])["batch"]
    buckets = _buckets(config, options, collate, kind, all_buckets)
    per_row = options.slots(kind)[0] * options.groups_per_row if options.kind == "pairs" else options.groups_per_row
    out = []

    def spec(shape, on):
        return _abstract(local.global_shapes(*shape, processes=processes), on)

    if "train" in names:
        steps = setup.steps()
        unremat = None
        if config.model.remat != "none":
            plain = config.copy_and_resolve_references()
            with plain.unlocked():
                plain.model.remat = "none"
            unremat = train.Setup(plain, mesh)
        for shape in buckets:
            batch = spec(shape, mesh)
            traced = train_step.jit_step(steps.train, setup.abstract, batch, mesh).trace(setup.abstract, batch)
            model = None
            if unremat is not None:
                model = lambda b=batch: train_step.jit_step(  # noqa: E731
                    unremat.steps().train, unremat.abstract, b, mesh).trace(unremat.abstract, b)
            patches = f", {shape[3]} patches per row" if shape[3] else ""
            out.append(Program("train", f"{shape[0] * processes} rows of {shape[1]} tokens{patches}", mesh, traced,
                               model, pairs=shape[0] * processes * per_row))
    if "eval" in names and config.data.eval:
        batch = spec(buckets[-1], mesh)
        traced = jax.jit(sharding.traced_on(mesh, setup.steps().eval)).trace(setup.abstract, batch)
        out.append(Program("eval", f"{buckets[-1][0] * processes} rows of {buckets[-1][1]} tokens", mesh, traced))
    one_host = host_mesh(config, devices)
    if "ref_logps" in names and options.kind == "pairs":  # the run's model, its parameters on one host
        graphdef = nnx.graphdef(setup.abstract_model)
        params = train_step.abstract_params(setup.abstract_model, one_host)
        whole = pipeline.Collate(options, config.data.batch_size, 0, vision, kind)([])["batch"]
        shape = (len(whole.valid),) + buckets[-1][1:]
        batch = _abstract(whole.global_shapes(*shape), one_host)
        layout = setup.dpo.pair_layout
        forward = sharding.traced_on(one_host, lambda p, b: logps.pair_logps(nnx.merge(graphdef, p), b,
                                                                             layout=layout))
        out.append(Program("ref_logps", f"{shape[0]} rows of {shape[1]} tokens on one host", one_host,
                           jax.jit(forward).trace(params, batch)))
    if "sample" in names:
        out.append(_sample_program(config, setup.model_config, vision, one_host, sample_prompts, sample_n))
    return out


def _sample_program(config, model_config, vision, mesh, prompts: int, n: int) -> Program:
    """`sampling.generate` of `prompts` prompts × `n` samples as `data_prep.sample` runs it with the run's
    compute dtype: prompts padded to the longest bucket less one answer, `data.max_answer_len` new tokens."""
    d = config.data
    dtype = config.model.dtype
    run = config_lib.RunSettings.from_config(config)
    run = dataclasses.replace(run, param_dtype=jnp.dtype(dtype), remat="none", check_image_tokens=False)
    model = families.abstract_model(model_config, run)  # the compute dtype's parameters, no remat
    graphdef, params = nnx.graphdef(model), train_step.abstract_params(model, mesh)
    rows = prompts + -prompts % mesh.devices.size
    T = max(64, (d.seq_buckets[-1] - d.max_answer_len) // 64 * 64)
    arrays, _ = vision.collate([None] * rows, slots=d.max_images)
    if "patches" in arrays:
        arrays = pad_patches(arrays, max(d.patch_buckets))
    if vision.mrope:
        arrays["positions"] = np.zeros((rows, 3, T), np.int32)
    shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.BATCH_AXES))
    cfg = sampling.SamplingConfig(max_new_tokens=d.max_answer_len, num_samples=n, stop_ids=(0,),
                                  suppress_ids=(model_config.image_token_id,))
    ids = jax.ShapeDtypeStruct((rows, T), jnp.int32, sharding=shard)
    arrays = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shard) for k, v in arrays.items()}
    keys = jax.ShapeDtypeStruct((rows * n,), jax.random.key(0).dtype, sharding=shard)

    def generate(params, ids, mask, arrays, keys):
        arrays = dict(arrays)
        positions = arrays.pop("positions", None)
        model = nnx.merge(graphdef, params)
        return sampling.generate(model, ids, mask, model.images_of(arrays), keys, cfg, positions)

    traced = jax.jit(sharding.traced_on(mesh, generate)).trace(params, ids, ids, arrays, keys)
    return Program("sample", f"{rows} prompts of {T} tokens × {n} samples, up to {d.max_answer_len} new tokens "
                   f"({dtype}) on one host", mesh, traced,
                   note="FLOPs and time: the prefill and one decode step (the decode loop stops when every row has)")
