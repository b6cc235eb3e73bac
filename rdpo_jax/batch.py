"""The training batch: one type whose fields declare their axes and pad values.

Every example is a prompt group (a pairs record is a group of one pair, an SFT example a group of one
answer and no pair). The batch's unit U — what shards over devices, splits into micro-batches and owns
images — is one record, or one row where `data.groups_per_row` > 1 packs several records into a row;
its rows are adjacent, so a unit never straddles devices. Axes:

    units     U   records (or packed rows)
    rows      R   token rows, R = U·k: k = 1 (SFT, multi_answer), P (shared_prefix), 2P (concat)
    tokens    T   the row length (a bucket)
    targets   A   trained tokens per row (what the LM head sees)
    slots     P   pair slots per unit (max_pairs_per_group × groups_per_row; 1 for pairs records and SFT)
    criteria  K   rubric criteria per pair (data.max_criteria)

Per-pair fields are [U, P, …] in every layout; pair slot p of unit u is pair u·P + p of the flat [U·P]
arrays `logps.pair_logps` returns. `images` holds the family adapter's arrays (`models/<family>/inputs.py`:
what the model's `images_of` reads), each [U, …]; patch buffers (below) pad their patch axis.

Patch buffers are how the any-resolution families (Qwen2.5-VL and those built on its pipeline) carry a
unit's images: its patches one after another in a buffer of a bucketed length N, with per-patch metadata
(`patch_image`: the image within the unit, −1 = padding; `patch_row`, `patch_col`: the patch's place in
its image's grid).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from rdpo_jax import sharding

PAD_ID = "pad_id"  # a field padded with the batch's pad token id
PATCH_KEYS = ("patches", "patch_image", "patch_row", "patch_col")  # float32[U, N, C·T·P·P], then int32[U, N] each
PATCH_PAD = {"patch_image": -1}  # what a padding patch holds besides zeros
DEFAULT_PATCH_BUCKETS = (256, 1024, 4096, 16384)


def _field(*axes, pad: Any = 0, dtype=np.int32, optional: bool = False):
    """A batch field: `axes` (first and last; `...` for any axes between), its pad value and dtype."""
    return flax.struct.field(default=None if optional else dataclasses.MISSING,
                             metadata={"axes": axes, "pad": pad, "dtype": dtype})


@flax.struct.dataclass
class Batch:
    input_ids: Any = _field("rows", "tokens", pad=PAD_ID)
    positions: Any = _field("rows", ..., "tokens")  # int32[R, T], or [R, 3, T] for M-RoPE families
    branch_ids: Any = _field("rows", "tokens", pad=-1)  # 0 prompt, 1… answers (`packing.py`), −1 padding
    targets: Any = _field("rows", "targets")  # the answer tokens
    target_index: Any = _field("rows", "targets")  # the row index whose hidden state predicts the target
    target_branch: Any = _field("rows", "targets")  # the target's answer branch, 0 = padding
    valid: Any = _field("units", "slots", dtype=np.float32)  # 1 for a pair (SFT: an example) to train on
    segment_ids: Any = _field("rows", "tokens", pad=-1, optional=True)  # rows packing several records
    pair_chosen: Any = _field("units", "slots", optional=True)  # multi_answer: each pair's answer branches
    pair_rejected: Any = _field("units", "slots", optional=True)
    chosen_scores: Any = _field("units", "slots", "criteria", dtype=np.float32, optional=True)  # rubric, in [0, 1]
    rejected_scores: Any = _field("units", "slots", "criteria", dtype=np.float32, optional=True)
    criterion_weights: Any = _field("units", "slots", "criteria", dtype=np.float32, optional=True)
    criterion_mask: Any = _field("units", "slots", "criteria", dtype=np.float32, optional=True)
    essential_mask: Any = _field("units", "slots", "criteria", dtype=np.float32, optional=True)
    ref_chosen_logp: Any = _field("units", "slots", dtype=np.float32, optional=True)  # precomputed reference
    ref_rejected_logp: Any = _field("units", "slots", dtype=np.float32, optional=True)
    images: dict = flax.struct.field(default_factory=dict)  # the family's arrays, each [U, …]
    pad_id: int = flax.struct.field(pytree_node=False, default=0)

    def arrays(self) -> dict[str, Any]:
        """{name: array} of the fields present (images not included)."""
        return {f.name: getattr(self, f.name) for f in FIELDS if getattr(self, f.name) is not None}

    def sizes(self) -> tuple[int, int, int, int]:
        """(units, row length, trained tokens per row, patch buffer length or 0): what selects a program."""
        n = self.images["patches"].shape[1] if "patches" in self.images else 0
        return self.valid.shape[0], self.input_ids.shape[1], self.targets.shape[1], n

    def per_pair(self, x):
        """A per-pair field [U, P, …] as the flat pairs [U·P, …] (None stays None)."""
        return None if x is None else x.reshape(-1, *x.shape[2:])

    def pad(self, units: int, seq_len: int, target_len: int, num_patches: int = 0) -> Batch:
        """This (numpy) batch grown to `units` units (padding ones: valid 0), its rows to `seq_len` tokens,
        its trained tokens to `target_len` and its patch buffers to `num_patches`, each field with its pad
        value; the same arrays where nothing grows."""
        if units < self.valid.shape[0] or seq_len < self.input_ids.shape[1] or target_len < self.targets.shape[1]:
            raise ValueError(f"cannot pad a batch of {self.sizes()[:3]} (units, tokens, targets) to "
                             f"{(units, seq_len, target_len)}")

        def grow(x, shape, fill):
            width = [(0, new - old) for old, new in zip(x.shape, shape)]
            return np.pad(x, width, constant_values=fill) if any(w for _, w in width) else x

        sizes = (units, seq_len, target_len, num_patches)
        return self.replace(
            **{f.name: grow(x, _shape(x, f.metadata["axes"], self.valid.shape[0], *sizes), self._fill(f))
               for f in FIELDS if (x := getattr(self, f.name)) is not None},
            images={k: grow(x, _image_shape(k, x, self.valid.shape[0], *sizes), PATCH_PAD.get(k, 0))
                    for k, x in self.images.items()})

    def _fill(self, f: dataclasses.Field):
        return self.pad_id if f.metadata["pad"] == PAD_ID else f.metadata["pad"]

    def global_shapes(self, units: int, seq_len: int, target_len: int, num_patches: int = 0, *,
                      processes: int = 1) -> Batch:
        """The global batch of `processes` processes' local batches of these `sizes()`, as ShapeDtypeStructs
        (from one local batch of any sizes)."""
        sizes, U = (units * processes, seq_len, target_len, num_patches), self.valid.shape[0]
        return self.replace(
            **{f.name: jax.ShapeDtypeStruct(_shape(x, f.metadata["axes"], U, *sizes), x.dtype)
               for f in FIELDS if (x := getattr(self, f.name)) is not None},
            images={k: jax.ShapeDtypeStruct(_image_shape(k, x, U, *sizes), x.dtype) for k, x in self.images.items()})

    def shardings(self, mesh: Mesh) -> Batch:
        """Every array's leading axis (units or rows) over the batch mesh axes (`sharding.BATCH_AXES`); the rest
        replicated."""
        def one(x):
            axes = ("batch",) + (None,) * (len(x.shape) - 1)
            return NamedSharding(mesh, sharding.logical_to_spec(axes, x.shape, dict(mesh.shape)))
        return jax.tree.map(one, self)

    def split_micro(self, accum: int) -> Batch:
        """[U, …] → [accum, U/accum, …] (a rows field moves its R/U rows per unit together); micro-batch i
        takes units i, i+accum, … so that, with units sharded in contiguous blocks over devices, every
        micro-batch stays spread over all devices (no transfer)."""
        U = self.valid.shape[0]
        if U % accum:
            raise ValueError(f"batch of {U} is not divisible by accum_steps={accum}")

        def split(x):
            per = x.shape[0] // U
            x = x.reshape(U // accum, accum, per, *x.shape[1:])
            return jnp.moveaxis(x, 1, 0).reshape(accum, (U // accum) * per, *x.shape[3:])

        return jax.tree.map(split, self)


FIELDS = tuple(f for f in dataclasses.fields(Batch) if "axes" in f.metadata)
RUBRIC_KEYS = tuple(f.name for f in FIELDS if f.metadata["axes"][-1] == "criteria")  # what the rubric loss reads


def _shape(x, axes: tuple, units: int, new_units: int, seq_len: int, target_len: int, _) -> tuple[int, ...]:
    """A field's shape in a batch of `new_units` units, `seq_len` tokens and `target_len` targets per row."""
    shape = [x.shape[0] // units * new_units, *x.shape[1:]]
    shape[-1] = {"tokens": seq_len, "targets": target_len}.get(axes[-1], shape[-1])
    return tuple(shape)


def _image_shape(key: str, x, units: int, new_units: int, _, __, num_patches: int) -> tuple[int, ...]:
    """An image array's shape: [U, …], a patch buffer's [U, N, …] with N = `num_patches` (0: as it is)."""
    shape = [new_units, *x.shape[1:]]
    if key in PATCH_KEYS and num_patches:
        shape[1] = num_patches
    return tuple(shape)


def blank(name: str, shape: tuple[int, ...], pad_id: int = 0) -> np.ndarray:
    """A field's array of `shape` holding its pad value (what packing fills in)."""
    f = next(f for f in FIELDS if f.name == name)
    return np.full(shape, pad_id if f.metadata["pad"] == PAD_ID else f.metadata["pad"], f.metadata["dtype"])


def pad_patches(images: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
    """A batch's patch buffers padded at the end to `length` patches (padding: image −1)."""
    if "patches" not in images or images["patches"].shape[1] == length:
        return images
    extra = length - images["patches"].shape[1]
    if extra < 0:
        raise ValueError(f"cannot pad patch buffers of {images['patches'].shape[1]} to {length}")
    out = dict(images)
    out["patches"] = np.pad(images["patches"], ((0, 0), (0, extra), (0, 0)))
    for key in PATCH_KEYS[1:]:
        out[key] = np.pad(images[key], ((0, 0), (0, extra)), constant_values=PATCH_PAD.get(key, 0))
    return out
