"""The jitted train steps: `dpo_step(state, batch)` and `sft_step(state, batch)`.

State is a plain pytree (`TrainState`): trainable parameters and their optimizer state, frozen
parameters (no gradient, no optimizer state) and, for an online reference, the reference copy of the
trainable parameters (the frozen ones are shared with the policy). Losses are (sum, count) pairs;
gradient accumulation scans over micro-batches and divides the summed gradients by the total count, so
an accumulated step equals the full-batch step.

The batch is a `batch.Batch` (its fields, axes and units are documented there).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rdpo_jax import logps, losses, optim, packing, sharding
from rdpo_jax.batch import RUBRIC_KEYS, Batch
from rdpo_jax.models import families, lora, moe

REFERENCES = ("model", "base", "precomputed", "none")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32[]
    params: dict  # trainable parameters (nested dict of arrays)
    opt_state: optax.OptState
    frozen: dict  # frozen parameters, never updated
    ref_params: dict | None  # reference copy of `params` (online reference), else None
    nonfinite: jax.Array  # int32[]: consecutive steps so far whose loss or gradients were not finite


def abstract_params(model: nnx.Module, mesh: Mesh, kind=nnx.Param) -> dict:
    """Every parameter of `model` (an abstract model, `families.abstract_model`; trainable and frozen; or
    those of `kind`, e.g. `nnx.LoRAParam`) as a ShapeDtypeStruct carrying its target sharding on `mesh`, in
    a nested dict: the target of parameter restores and loads."""
    state = nnx.state(model, kind)
    shardings = nnx.to_pure_dict(sharding.state_shardings(state, mesh))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nnx.to_pure_dict(state),
                        shardings)


def abstract_state(model: nnx.Module, optimizer: optax.GradientTransformation, mesh: Mesh, *, freeze=(),
                   reference: bool = False) -> tuple[nnx.GraphDef, TrainState]:
    """The TrainState of `model` (an abstract model, `families.abstract_model`) as ShapeDtypeStructs
    carrying their target shardings on `mesh` (no memory): the target of checkpoint restores and of
    `new_state`. A model with adapters (`models/lora.py`) trains those only: every other parameter is
    frozen."""
    lora = any(True for _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)))
    graphdef, params, frozen = optim.split_params(model, freeze, nnx.LoRAParam if lora else nnx.Param)
    full = abstract_params(model, mesh)

    def place(tree):
        return jax.tree_util.tree_map_with_path(lambda kp, _: optim.tree_get(full, kp, "model"), tree)

    params, frozen = place(params), place(frozen)
    opt_shapes = jax.eval_shape(optimizer.init, params)
    opt_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), opt_shapes,
                             sharding.follow_params(opt_shapes, params, mesh))
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec()))
    return graphdef, TrainState(step=scalar, params=params, opt_state=opt_state, frozen=frozen,
                                ref_params=params if reference else None, nonfinite=scalar)


def new_state(params: dict, optimizer: optax.GradientTransformation, abstract: TrainState,
              reference: dict | None = None) -> TrainState:
    """The TrainState at step 0 from a model's parameters (a nested dict of every parameter, trainable
    and frozen: loaded, restored or freshly initialized), split as `abstract` splits them, with a fresh
    optimizer state and, if `abstract` has one, the reference copy: of `params`, or of `reference` (another
    model's parameters, e.g. the first policy of iterative DPO); one jit onto `abstract`'s shardings.
    Only trainable parameters have a reference copy, so `reference`'s frozen ones must equal `params`'."""
    def build(params, reference):
        def pick(tree, source):
            return jax.tree_util.tree_map_with_path(lambda kp, _: optim.tree_get(source, kp, "model"), tree)

        trainable = pick(abstract.params, params)
        ref = None
        if abstract.ref_params is not None:
            ref = jax.tree.map(jnp.copy, trainable if reference is None else pick(abstract.params, reference))
        zero = jnp.zeros((), jnp.int32)
        return TrainState(step=zero, params=trainable, opt_state=optimizer.init(trainable),
                          frozen=pick(abstract.frozen, params), ref_params=ref, nonfinite=zero)

    if reference is not None:
        frozen = [jax.tree_util.tree_map_with_path(lambda kp, _: optim.tree_get(p, kp, "model"), abstract.frozen)
                  for p in (params, reference)]
        equal = jax.jit(lambda a, b: jnp.all(jnp.stack([jnp.array_equal(x, y) for x, y in
                                                         zip(jax.tree.leaves(a), jax.tree.leaves(b))] or [True])))
        if not bool(equal(*frozen)):
            raise ValueError("the reference model's frozen parameters differ from the policy's: only trainable "
                             "parameters have a reference copy (freeze the same parameters in both, or train them)")
    return jax.jit(build, out_shardings=jax.tree.map(lambda x: x.sharding, abstract))(params, reference)


def with_frozen(state: TrainState, params: dict, abstract: TrainState) -> TrainState:
    """`state` (restored without its frozen parameters: a LoRA run's) with them taken from `params` (every
    parameter of the model), placed as `abstract` places them."""
    frozen = jax.tree_util.tree_map_with_path(lambda kp, _: optim.tree_get(params, kp, "model"), abstract.frozen)
    return state.replace(frozen=jax.device_put(frozen, jax.tree.map(lambda x: x.sharding, abstract.frozen)))


def init_state(model: nnx.Module, optimizer: optax.GradientTransformation, *, freeze=(),
               reference: bool = False) -> tuple[nnx.GraphDef, TrainState]:
    """`new_state` of a (sharded) model on the mesh its parameters live on."""
    mesh = sharding.mesh_of(nnx.state(model, nnx.Param))
    graphdef, abstract = abstract_state(families.abstract_model(model.config, model.run), optimizer, mesh,
                                        freeze=freeze, reference=reference)
    return graphdef, new_state(nnx.to_pure_dict(nnx.state(model, nnx.Param)), optimizer, abstract)


# ----- micro-batching -----

def _accumulate(loss_fn: Callable, params, batch: Batch, accum: int):
    """`loss_fn(params, batch, i) -> (loss sum, (sums, per_pair))` (i: the micro-batch's index): Σ over
    micro-batches (`Batch.split_micro`) of (grad of the loss sum, sums), and `per_pair` (arrays shaped like
    the batch's `valid`) back in the batch's unit order."""
    grad_fn = jax.grad(loss_fn, has_aux=True)
    if accum == 1:
        grads, (sums, per_pair) = grad_fn(params, batch, jnp.uint32(0))
        return grads, sums, per_pair
    micro = batch.split_micro(accum)

    def body(carry, inputs):
        grads, (sums, per_pair) = grad_fn(params, *inputs)
        return jax.tree.map(jnp.add, carry, (grads, sums)), per_pair

    first = jax.tree.map(lambda x: x[0], micro)
    grads, (sums, _) = jax.eval_shape(grad_fn, params, first, jnp.uint32(0))
    (grads, sums), per_pair = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, (grads, sums)),
                                           (micro, jnp.arange(accum, dtype=jnp.uint32)))
    # [accum, U/accum, …] → [U, …]: micro-batch i held units i, i+accum, … (split_micro)
    per_pair = jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1).reshape(-1, *x.shape[2:]), per_pair)
    return grads, sums, per_pair


def _masked_sums(metrics: dict[str, jax.Array], valid: jax.Array) -> dict[str, tuple[jax.Array, jax.Array]]:
    """(Σ value, Σ weight) per metric over valid, finite entries (agreement metrics may be NaN)."""
    out = {}
    for name, value in metrics.items():
        ok = valid * jnp.isfinite(value)
        out[name] = (jnp.where(ok > 0, value, 0.0).sum(), ok.sum())
    return out


def _update(state: TrainState, optimizer, schedule, grads, loss_sum, count, metric_sums):
    """Applies the optimizer, unless

    - the global batch holds nothing to train on (`count` = 0: every record skipped as bad): a zero
      gradient would still move the parameters (Adam's momentum, weight decay) and advance the schedule,
      so parameters and optimizer state stay as they were, and `empty` = 1 says so;
    - the loss or the gradients are not finite: parameters and optimizer state stay as they were,
      `nonfinite` = 1 and the state's streak of such steps grows (the trainer stops on a streak, reading
      `nonfinite_streak` when it logs; an empty step neither grows nor ends a streak).

    `count` is summed over the global batch inside the step, so every process takes the same decision."""
    grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), grads)
    loss = loss_sum / jnp.maximum(count, 1.0)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    empty = count == 0
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite & ~empty, new, old),
                                     (params, opt_state), (state.params, state.opt_state))
    metrics = {name: s / jnp.maximum(n, 1.0) for name, (s, n) in metric_sums.items()}
    # the rate this update applies: the schedule at the optimizer's own count, which skipped steps do not
    # advance (state.step, the data position, counts every step)
    applied = optim.updates_applied(state.opt_state)
    metrics.update(loss=loss, grad_norm=grad_norm, lr=schedule(state.step if applied is None else applied), count=count,
                   nonfinite=(~finite).astype(jnp.float32), empty=empty.astype(jnp.float32))
    streak = jnp.where(empty, state.nonfinite, jnp.where(finite, 0, state.nonfinite + 1))
    metrics["nonfinite_streak"] = streak
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, nonfinite=streak), metrics


# ----- objectives: loss_fn(params, frozen, ref_params, batch) -> (loss sum, (count, metric sums)) -----

@dataclasses.dataclass(frozen=True)
class DPOSettings:
    """The DPO options of a run (`config.dpo` but `reference_from`, a path the trainer loads), checked when
    made: `from_config` builds it once; `dpo_loss` and `make_dpo_step` take it whole."""

    loss_type: str  # one of `losses.LOSS_TYPES`
    beta: float  # inverse temperature β > 0
    label_smoothing: float = 0.0  # ε of cdpo / robust, in [0, 0.5)
    gamma: float = 0.0  # per-criterion margin γ of the rubric loss
    length_norm: bool = False  # token-mean log-likelihoods instead of sums (ipo expects them)
    sft_weight: float = 0.0  # α·(token-mean NLL of the chosen answer) added to every pair's loss
    pair_layout: str = "shared_prefix"  # one of `packing.LAYOUTS`
    reference: str = "model"  # one of `REFERENCES`

    def __post_init__(self):
        for field, ok, message in (
                ("loss_type", self.loss_type in losses.LOSS_TYPES,
                 f"{self.loss_type!r} is not one of {losses.LOSS_TYPES}"),
                ("reference", self.reference in REFERENCES, f"{self.reference!r} is not one of {REFERENCES}"),
                ("pair_layout", self.pair_layout in packing.LAYOUTS,
                 f"{self.pair_layout!r} is not one of {packing.LAYOUTS}"),
                ("beta", self.beta > 0, "must be positive"),
                ("length_norm", self.loss_type != "ipo" or self.length_norm,
                 "loss_type 'ipo' expects length-normalized log-likelihoods: set dpo.length_norm=True"),
                ("label_smoothing", 0 <= self.label_smoothing < 0.5, "must be in [0, 0.5)")):
            if not ok:
                raise ValueError(f"config.dpo.{field}: {message}")

    @classmethod
    def from_config(cls, dpo) -> DPOSettings:
        """From a training config's `dpo` section."""
        return cls(**{f.name: dpo[f.name] for f in dataclasses.fields(cls)})


def dpo_loss(graphdef: nnx.GraphDef, dpo: DPOSettings, *, pair_values: bool = False) -> Callable:
    """The DPO objective over a batch of pairs (any loss type of `losses.py`, any layout). With
    `pair_values`, the aux also holds every pair slot's policy log-likelihoods and answer token counts
    ({chosen_logp, rejected_logp, chosen_count, rejected_count}: float32 shaped like `batch.valid`)."""

    def normalize(logp, count):
        return logp / jnp.maximum(count, 1.0) if dpo.length_norm else logp

    def loss_fn(params, frozen, ref_params, batch: Batch):
        policy = _policy(graphdef, params, frozen)
        out = logps.pair_logps(policy, batch, layout=dpo.pair_layout)  # [U·P] each
        if dpo.reference in ("model", "base"):
            with lora.dropout_key(None):  # the reference is deterministic
                ref = logps.pair_logps(_reference(graphdef, params, frozen, ref_params, dpo.reference), batch,
                                       layout=dpo.pair_layout)
            ref_c, ref_r = jax.lax.stop_gradient((ref["chosen_logp"], ref["rejected_logp"]))
        elif dpo.reference == "precomputed":
            ref_c, ref_r = batch.per_pair(batch.ref_chosen_logp), batch.per_pair(batch.ref_rejected_logp)
        else:
            ref_c = ref_r = jnp.zeros_like(out["chosen_logp"])
        cc, rc = out["chosen_count"], out["rejected_count"]
        loss, metrics = losses.preference_loss(
            normalize(out["chosen_logp"], cc), normalize(out["rejected_logp"], rc),
            normalize(ref_c, cc), normalize(ref_r, rc), loss_type=dpo.loss_type, beta=dpo.beta,
            label_smoothing=dpo.label_smoothing, gamma=dpo.gamma,
            **{k: batch.per_pair(getattr(batch, k)) for k in RUBRIC_KEYS})
        if dpo.sft_weight:
            nll = losses.token_nll(out["chosen_logp"], cc)
            loss = loss + dpo.sft_weight * nll
            metrics["sft_nll"] = nll
        valid = batch.per_pair(batch.valid)
        balance, moe_metrics = _load_balancing(policy, valid.sum())
        aux = (valid.sum(), _masked_sums(metrics, valid) | moe_metrics)
        if pair_values:
            aux += ({k: out[k].reshape(batch.valid.shape) for k in PAIR_VALUES},)
        return (loss * valid).sum() + balance, aux

    return loss_fn


def sft_loss(graphdef: nnx.GraphDef) -> Callable:
    """Token-mean negative log-likelihood of the answers over the batch (a unit is one row: valid [R, 1])."""

    def loss_fn(params, frozen, ref_params, batch: Batch):
        del ref_params
        policy = _policy(graphdef, params, frozen)
        token_logps = logps.token_logps(policy, batch)
        tokens = (batch.target_branch > 0) * batch.valid
        balance, moe_metrics = _load_balancing(policy, tokens.sum())
        return -(token_logps * tokens).sum() + balance, (tokens.sum(), moe_metrics)

    return loss_fn


def _policy(graphdef: nnx.GraphDef, params, frozen):
    """The trained model, its MoE routers (if any) recording their statistics for `_load_balancing`."""
    model = nnx.merge(graphdef, params, frozen)
    if model.config.text.moe:
        model.set_attributes(record_router=True)
    return model


def _reference(graphdef: nnx.GraphDef, params, frozen, ref_params, kind: str):
    """The reference model: "model", the reference copy of the trainable parameters with the frozen ones;
    "base", the policy with its adapters switched off (the frozen base itself: no copy)."""
    if kind == "model":
        return nnx.merge(graphdef, ref_params, frozen)
    model = nnx.merge(graphdef, params, frozen)
    if not nnx.state(model, nnx.LoRAParam):
        raise ValueError("dpo.reference='base' is the base under a LoRA run's adapters, but the model has none")
    model.set_attributes(lora_on=False, raise_if_not_found=False)
    return model


def _load_balancing(policy, count: jax.Array) -> tuple[jax.Array, dict]:
    """The MoE load-balancing term of a loss sum over `count` units — coefficient × transformers' aux loss
    over this forward's real tokens, × count, so that dividing by the batch's count adds coefficient ×
    aux loss (accumulated: the micro-batches' count-weighted mean) — and its metrics: `moe/aux_loss` and
    `moe/load/{e}`, expert e's share of the top-k assignments × E (1 = an even load). (0, {}) for a dense
    model."""
    cfg = policy.config.text.moe
    if cfg is None:
        return jnp.zeros((), jnp.float32), {}
    stats = sum(jax.tree.leaves(nnx.pop(policy, nnx.Intermediate)))  # [3, E], summed over forwards
    value = moe.aux_loss(stats)
    load = stats[0] / jnp.maximum(stats[0].sum(), 1.0) * cfg.num_experts
    metrics = {"moe/aux_loss": (value * count, count)}
    metrics |= {f"moe/load/{e}": (load[e] * count, count) for e in range(cfg.num_experts)}
    return cfg.aux_loss_coef * value * count, metrics


def make_step(loss_fn: Callable, optimizer: optax.GradientTransformation, schedule: optax.Schedule, *,
              accum_steps: int = 1, dropout_seed: int | None = None) -> Callable[[TrainState, Batch], tuple]:
    """The pure `step(state, batch) -> (state, metrics)` for an objective (jit it with `jit_step`).

    When the loss reports its pairs' log-likelihoods (`dpo_loss(pair_values=True)`) and the batch carries
    precomputed reference ones, `metrics["reference_check"]` compares them (`reference_check`): at a
    run's first step, before any update, they must agree when the reference is the initial policy.
    `dropout_seed`: the adapters' dropout (`lora.dropout`) draws from (seed, step, micro-batch), so that
    a resumed run draws what the uninterrupted one did."""

    def step(state: TrainState, batch: Batch):
        key = None if dropout_seed is None else jax.random.fold_in(jax.random.key(dropout_seed), state.step)

        def per_params(params, b, i):
            with lora.dropout_key(None if key is None else jax.random.fold_in(key, i)):
                loss_sum, (count, metric_sums, *per_pair) = loss_fn(params, state.frozen, state.ref_params, b)
            return loss_sum, ((loss_sum, count, metric_sums), per_pair[0] if per_pair else {})

        grads, (loss_sum, count, metric_sums), per_pair = _accumulate(per_params, state.params, batch, accum_steps)
        state, metrics = _update(state, optimizer, schedule, grads, loss_sum, count, metric_sums)
        if per_pair and batch.ref_chosen_logp is not None:
            metrics["reference_check"] = reference_check(per_pair, batch)
        return state, metrics

    return step


PAIR_VALUES = ("chosen_logp", "rejected_logp", "chosen_count", "rejected_count")
# How far a precomputed reference log-likelihood (a sum over an answer's n tokens) may be from the policy's
# own when the reference is the initial policy, at the first step: 0.25 + 0.02·n nats. Two bfloat16
# programs of the same model (other mesh, other row length) differed by at most 0.004 nats on the smoke
# pairs (float32: 2e-6); a bfloat16 logit of magnitude 20 rounds by up to 0.08, hence the floor for short
# answers. Another record's values or another model's miss by far more (tests/test_train.py).
REFERENCE_TOLERANCE = (0.25, 0.02)


def reference_check(per_pair: dict, batch: Batch) -> dict[str, jax.Array]:
    """The valid pair slot whose policy log-likelihoods (`per_pair`, see `dpo_loss`) are furthest from
    the batch's precomputed reference ones, in units of `REFERENCE_TOLERANCE` (the larger of chosen and
    rejected): {ratio: float32[] (> 1: beyond the tolerance; −1: no valid pair), slot: int32[] (flat index
    into `valid`), policy, reference, tokens: float32[2] (chosen, rejected)}."""
    policy = jnp.stack([per_pair["chosen_logp"], per_pair["rejected_logp"]]).reshape(2, -1)
    reference = jnp.stack([batch.ref_chosen_logp, batch.ref_rejected_logp]).reshape(2, -1).astype(jnp.float32)
    tokens = jnp.stack([per_pair["chosen_count"], per_pair["rejected_count"]]).reshape(2, -1)
    floor, per_token = REFERENCE_TOLERANCE
    ratio = (jnp.abs(policy - reference) / (floor + per_token * tokens)).max(0)
    # a NaN reference is the non-finite guard's to report
    ratio = jnp.where((batch.valid.reshape(-1) > 0) & jnp.isfinite(ratio), ratio, -1.0)
    slot = jnp.argmax(ratio)
    return {"ratio": ratio[slot], "slot": slot.astype(jnp.int32), "policy": policy[:, slot],
            "reference": reference[:, slot], "tokens": tokens[:, slot]}


def make_eval_step(loss_fn: Callable) -> Callable[[TrainState, Batch], dict]:
    """`eval_step(state, batch) -> {name: (sum, count)}` for held-out batches (the host adds them up)."""

    def eval_step(state: TrainState, batch: Batch):
        loss_sum, (count, metric_sums, *_) = loss_fn(state.params, state.frozen, state.ref_params, batch)
        return {"loss": (loss_sum, count), **metric_sums}

    return eval_step


class Steps(NamedTuple):
    train: Callable[[TrainState, Batch], tuple]  # step(state, batch) -> (state, metrics)
    eval: Callable[[TrainState, Batch], dict]  # eval_step(state, batch) -> {name: (sum, count)}


def make_dpo_step(graphdef, optimizer, schedule, dpo: DPOSettings, *, accum_steps: int = 1,
                  dropout_seed: int | None = None) -> Steps:
    """The DPO train and held-out steps (a precomputed reference is checked against the policy's own
    log-likelihoods: `reference_check`)."""
    loss_fn = dpo_loss(graphdef, dpo, pair_values=dpo.reference == "precomputed")
    return Steps(make_step(loss_fn, optimizer, schedule, accum_steps=accum_steps, dropout_seed=dropout_seed),
                 make_eval_step(loss_fn))


def make_sft_step(graphdef, optimizer, schedule, *, accum_steps: int = 1, dropout_seed: int | None = None) -> Steps:
    """The SFT train and held-out steps."""
    loss_fn = sft_loss(graphdef)
    return Steps(make_step(loss_fn, optimizer, schedule, accum_steps=accum_steps, dropout_seed=dropout_seed),
                 make_eval_step(loss_fn))


# ----- jit with explicit shardings -----

def jit_step(step_fn: Callable, state: TrainState, batch: Batch, mesh: Mesh) -> Any:
    """`jax.jit` with the state donated and explicit in/out shardings (state keeps its shardings), traced
    on `mesh` so that the model's activation constraints apply."""
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    return jax.jit(sharding.traced_on(mesh, step_fn), in_shardings=(state_sh, batch.shardings(mesh)),
                   out_shardings=(state_sh, NamedSharding(mesh, PartitionSpec())), donate_argnums=0)
