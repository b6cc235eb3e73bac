"""Semantic checks of a training config, before anything heavy runs; every message names the field."""

from __future__ import annotations

import math
import os
import re

from rdpo_jax import sharding, train_step
from rdpo_jax.models import config as model_config


class ConfigError(ValueError):
    pass


def _check(cond: bool, field: str, message: str):
    if not cond:
        raise ConfigError(f"config.{field}: {message}")


def patterns(text: str, field: str) -> tuple[str, ...]:
    """"a/.*,b/.*" → ("a/.*", "b/.*"), each a valid regex."""
    out = tuple(p.strip() for p in text.split(",") if p.strip())
    for p in out:
        try:
            re.compile(p)
        except re.error as e:
            raise ConfigError(f"config.{field}: {p!r} is not a regex ({e})") from None
    return out


def multipliers(text: str, field: str) -> tuple[tuple[str, float], ...]:
    """"REGEX=MULT,…" → ((regex, mult), …)."""
    out = []
    for item in patterns(text, field):
        regex, sep, mult = item.rpartition("=")
        try:
            out.append((patterns(regex, field)[0], float(mult)))
        except (ValueError, IndexError):
            raise ConfigError(f"config.{field}: {item!r} is not REGEX=MULTIPLIER") from None
        _check(bool(sep), field, f"{item!r} is not REGEX=MULTIPLIER")
    return tuple(out)


def dpo_settings(c) -> train_step.DPOSettings:
    """`c.dpo` as the settings the DPO step takes (`train_step.DPOSettings`, which checks them)."""
    try:
        return train_step.DPOSettings.from_config(c.dpo)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def lora_settings(c):
    """`c.lora` as `lora.LoRASettings` (None: no adapters), checked."""
    try:
        return model_config.LoRASettings.from_config(c.lora)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def validate(c, *, num_devices: int, num_processes: int) -> dict[str, int]:
    """Raises ConfigError for the first problem; returns the mesh sizes."""
    _check(c.objective in ("sft", "dpo"), "objective", f"{c.objective!r} is not 'sft' or 'dpo'")
    _check(bool(c.model.path), "model.path", "is empty: give a Hugging Face model folder")
    _check(os.path.exists(os.path.join(c.model.path, "config.json")), "model.path",
           f"{c.model.path!r} has no config.json")
    for field in ("param_dtype", "dtype"):  # names first, so a typo gets the list of dtypes
        _check(c.model[field] in model_config.DTYPES, f"model.{field}",
               f"{c.model[field]!r} is not one of {sorted(model_config.DTYPES)}")
    lora = lora_settings(c)
    # bfloat16 has 8 bits of mantissa: an Adam step of lr 1e-6 on a weight near 1 is 2^-20 of it and rounds
    # to nothing. Train float32 master weights; `model.dtype` casts them for the matmuls inside the step. A
    # LoRA run's base is frozen (its adapters are float32 whatever the base): it may be stored in bfloat16.
    _check(c.model.param_dtype == "float32" or lora is not None, "model.param_dtype",
           f"{c.model.param_dtype!r}: training keeps float32 parameters (the master copy Adam updates; bfloat16 "
           "weights and moments round small updates away); for bfloat16 matmuls set model.dtype='bfloat16', "
           "and export bfloat16 weights with `python -m rdpo_jax.export --dtype=bfloat16` (a LoRA run, "
           "lora.rank > 0, may keep its frozen base in bfloat16)")
    if lora is not None:
        _check(c.init_from != "scratch", "init_from", "'scratch' with lora.rank > 0: adapters train on a base "
               "model; give one (\"model\", an HF folder or a run's workdir)")
    _check(c.model.remat in model_config.REMAT_POLICIES, "model.remat",
           f"{c.model.remat!r} is not one of {model_config.REMAT_POLICIES}")
    _check(c.model.vocab_chunk >= 0, "model.vocab_chunk",
           f"{c.model.vocab_chunk}: give the LM head's vocabulary columns per chunk (0 = all at once)")
    _check(c.model.attention in ("auto",) + model_config.ATTENTION, "model.attention",
           f"{c.model.attention!r} is not 'auto' or one of {model_config.ATTENTION}")
    _check(c.init_from in ("model", "scratch") or os.path.exists(c.init_from), "init_from",
           f"{c.init_from!r} is not 'model', 'scratch' or an existing path")
    _check(c.total_steps > 0, "total_steps", "must be positive")
    _check(c.accum_steps > 0, "accum_steps", "must be positive")
    _check(bool(c.data.train), "data.train", "is empty: give the training dataset")
    _check(c.data.on_bad_record in ("error", "skip"), "data.on_bad_record", f"{c.data.on_bad_record!r}")
    _check(len(c.data.seq_buckets) > 0 and list(c.data.seq_buckets) == sorted(set(c.data.seq_buckets)),
           "data.seq_buckets", f"must be increasing, got {tuple(c.data.seq_buckets)}")
    _check(c.data.max_pairs_per_group > 0, "data.max_pairs_per_group", "must be positive")
    _check(c.data.groups_per_row >= 1, "data.groups_per_row", "must be positive (1 = one record per row)")
    _check(c.data.max_answers_per_group >= 0, "data.max_answers_per_group", "must be ≥ 0 (0 = 2 × max_pairs_per_group)")
    _check(c.checkpoint.every > 0 and c.checkpoint.keep > 0, "checkpoint", "every and keep must be positive")
    _check(c.log.every > 0, "log.every", "must be positive")
    if c.objective == "dpo":
        dpo_settings(c)
        _check(not (c.dpo.reference == "precomputed" and c.init_from == "scratch"), "dpo.reference",
               "precomputed reference log-likelihoods cannot come from a model initialized from scratch")
        _check(not c.dpo.reference_from or os.path.exists(c.dpo.reference_from), "dpo.reference_from",
               f"{c.dpo.reference_from!r} is not an existing HF folder or run workdir")
        _check(not c.dpo.reference_from or c.dpo.reference != "none", "dpo.reference_from",
               "is set, but dpo.reference is 'none': there is no reference to load")
        _check(c.dpo.reference != "base" or lora is not None, "dpo.reference",
               "'base' is the frozen base under a LoRA run's adapters: set lora.rank > 0, or use 'model'")
        initial = os.path.abspath(c.model.path if c.init_from == "model" else c.init_from)
        other = bool(c.dpo.reference_from) and os.path.abspath(c.dpo.reference_from) != initial
        _check(c.dpo.reference != "base" or not other, "dpo.reference_from",
               "is set, but dpo.reference is 'base' (the run's own base): use reference='precomputed' "
               "(data_prep.ref_logps) for another reference model")
        _check(lora is None or c.dpo.reference != "model" or not other, "dpo.reference_from",
               "a LoRA run's online reference is its own base or adapters; for another model use "
               "reference='precomputed' (data_prep.ref_logps)")
    patterns(c.optim.freeze, "optim.freeze")
    multipliers(c.optim.lr_multipliers, "optim.lr_multipliers")

    try:
        mesh = sharding.mesh_sizes(dict(c.mesh), num_devices)
    except ValueError as e:
        raise ConfigError(f"config.mesh: {e}") from None
    replicas = math.prod(mesh[a] for a in sharding.BATCH_AXES)  # the batch is split over these
    B = c.data.batch_size
    _check(B % num_processes == 0, "data.batch_size", f"{B} is not divisible by the {num_processes} processes")
    _check(B % c.accum_steps == 0, "data.batch_size", f"{B} is not divisible by accum_steps={c.accum_steps}")
    micro = B // c.accum_steps
    _check(micro % replicas == 0, "data.batch_size",
           f"micro-batches of {micro} (batch_size / accum_steps) are not divisible by data × fsdp × expert = {replicas} "
           f"(mesh {mesh})")
    k = c.data.groups_per_row
    _check(k == 1 or c.objective == "sft" or c.dpo.pair_layout == "multi_answer", "data.groups_per_row",
           f"{k}: records share rows only in SFT and in DPO's multi_answer layout (set 1, or "
           "dpo.pair_layout='multi_answer')")
    if k > 1:  # a process packs its B/n records into B/(n·k) rows: the rows are what is split
        local = B // num_processes
        rows = B // k
        _check(local % k == 0 and rows % c.accum_steps == 0 and (rows // c.accum_steps) % replicas == 0,
               "data.groups_per_row", f"{k}: batch_size {B} over {num_processes} processes gives {local} records per "
               f"process; with {k} per row the {rows} rows must split into accum_steps={c.accum_steps} micro-batches "
               f"divisible by data × fsdp × expert = {replicas}")
    return mesh
