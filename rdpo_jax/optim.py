"""Trainable/frozen split by regex, and the AdamW optimizer with schedules and per-group learning rates.

Parameter paths are written with "/" (`vision_tower/encoder/layers/0/mlp/fc1/kernel`), so regexes
need no escaped dots: `freeze=("vision_tower/.*",)`, `lr_multipliers=(("multi_modal_projector/.*", 10.0),)`.
Frozen parameters get no gradient computation, no update and no optimizer state.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import optax
from flax import nnx

from rdpo_jax import sharding

SCHEDULES = ("cosine", "linear", "constant")


def path_str(path) -> str:
    """A parameter path (an NNX path or a jax key path, see `sharding.key_names`) as "a/b/0/c"."""
    return "/".join(sharding.key_names(path))


def tree_get(tree: dict, key_path, where: str):
    """tree[k1][k2]… for the names of `key_path`, matching dict keys by their string form (list indices
    are ints in one tree and strings in a checkpoint's metadata). Raises ValueError (naming `where`)
    if `tree` lacks the path."""
    node = tree
    for name in sharding.key_names(key_path):
        match = [key for key in node if str(key) == name] if isinstance(node, dict) else []
        if not match:
            raise ValueError(f"{where}: parameter {path_str(key_path)} is in one model but "
                             "not the other (a different architecture, or model.scan_layers: stacked vs per-layer parameters?)")
        node = node[match[0]]
    return node


def _matches(patterns: Sequence[str], path: str) -> bool:
    return any(re.fullmatch(p, path) for p in patterns)


def split_params(model: nnx.Module, freeze: Sequence[str] = (), trainable=nnx.Param) -> tuple[nnx.GraphDef, dict, dict]:
    """(graphdef, trainable, frozen): the model's parameters as two plain nested dicts of arrays; only
    parameters of the `trainable` type train (`nnx.LoRAParam`: a LoRA run's adapters), less `freeze`.

    `nnx.merge(graphdef, trainable, frozen)` rebuilds the model. A regex that matches nothing is an
    error (a typo would otherwise silently train what the user meant to freeze).
    """
    paths = [path_str(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    for pattern in freeze:
        if not any(re.fullmatch(pattern, p) for p in paths):
            raise ValueError(f"freeze pattern {pattern!r} matches no parameter (paths look like {paths[0]!r})")
    is_trainable = nnx.All(trainable, lambda path, _: not _matches(freeze, path_str(path)))
    graphdef, trainable, frozen = nnx.split(model, is_trainable, ...)
    return graphdef, nnx.to_pure_dict(trainable), nnx.to_pure_dict(frozen)


def learning_rate_schedule(*, learning_rate: float, schedule: str, warmup_steps: int, total_steps: int,
                           end_lr_factor: float = 0.0) -> optax.Schedule:
    """Linear warmup from 0, then cosine or linear decay to `end_lr_factor`·lr at `total_steps`, or constant."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} is not one of {SCHEDULES}")
    decay_steps = max(total_steps - warmup_steps, 1)
    end = learning_rate * end_lr_factor
    if schedule == "cosine":
        decay = optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=end_lr_factor)
    elif schedule == "linear":
        decay = optax.linear_schedule(learning_rate, end, decay_steps)
    else:
        decay = optax.constant_schedule(learning_rate)
    if warmup_steps <= 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps), decay], [warmup_steps])


def updates_applied(opt_state) -> jax.Array | None:
    """How many updates the optimizer has applied (its first `count`: Adam's and the learning-rate
    schedule's move together), or None if it keeps no count (plain SGD). A step skipped for non-finite
    gradients keeps the old optimizer state, so it does not count."""
    counts = optax.tree_utils.tree_get_all_with_path(opt_state, "count")
    return counts[0][1] if counts else None


def make_optimizer(*, learning_rate: optax.Schedule | float, weight_decay: float = 0.0, b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8, grad_clip: float = 0.0,
                   lr_multipliers: Sequence[tuple[str, float]] = ()) -> optax.GradientTransformation:
    """AdamW over the trainable parameters (a plain nested dict).

    Weight decay applies to matrices only (kernels, embeddings), never to norms or biases. A parameter
    whose path fully matches a regex of `lr_multipliers` trains at that multiple of the learning rate
    (first match wins).
    """
    def decay_mask(params):
        return jax.tree_util.tree_map_with_path(
            lambda kp, x: x.ndim >= 2 and path_str(kp).rsplit("/", 1)[-1] not in ("bias", "scale"), params)

    def group_labels(params):
        def label(kp, _):
            path = path_str(kp)
            return next((str(i) for i, (p, _) in enumerate(lr_multipliers) if re.fullmatch(p, path)), "default")
        return jax.tree_util.tree_map_with_path(label, params)

    if not callable(learning_rate):
        learning_rate = optax.constant_schedule(learning_rate)
    groups = {"default": optax.scale_by_learning_rate(learning_rate)}
    for i, (_, multiplier) in enumerate(lr_multipliers):
        groups[str(i)] = optax.scale_by_learning_rate(lambda step, m=multiplier: m * learning_rate(step))
    return optax.chain(
        optax.clip_by_global_norm(grad_clip) if grad_clip > 0 else optax.identity(),
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        optax.add_decayed_weights(weight_decay, mask=decay_mask) if weight_decay > 0 else optax.identity(),
        optax.multi_transform(groups, group_labels) if lr_multipliers else groups["default"],
    )
