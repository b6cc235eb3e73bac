"""Orbax checkpoints of the train state, and parameter-only restores.

A checkpoint step holds one item, `state` (the TrainState pytree: step, parameters, optimizer state,
frozen and reference parameters). The data position needs no item of its own: global batch s is a
pure function of (seed, s) (`pipeline.make_dataset`), so a restored run continues at batch `step` —
with any number of processes, devices or workers. Orbax writes each step into a temporary directory and
renames it when complete, so a save killed half way is never mistaken for a checkpoint; restores read
the latest complete step onto whatever mesh the target shardings describe (a run saved as 2×4 restores
as 4×2).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
import orbax.checkpoint as ocp
from etils import epath

from rdpo_jax import optim

STATE = "state"
# Orbax writes a replicated array as one slice per replica, in parallel; each slice is a small device op
# of its own. Below this many bytes per slice that costs more than it saves (on a small model, most of a
# save's time), so such arrays are written by one replica.
MIN_REPLICA_SLICE_BYTES = 8 << 20


def _register_array_handler():
    absl_logger = logging.getLogger("absl")  # Orbax warns at every override of its default handler
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES),
            override=True)
    finally:
        absl_logger.setLevel(level)


_register_array_handler()


class Checkpointer:
    """`frozen=False` (LoRA runs): the state's frozen parameters — the base, which `base.json` names — are
    neither written nor read; a restored state's `frozen` is {} until the caller loads the base again."""

    def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True, frozen: bool = True):
        options = ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep,
                                               enable_async_checkpointing=async_save, create=True)
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE,))
        self.frozen = frozen

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, *, force: bool = False) -> bool:
        """Saves if `step` is on the interval (or `force`, or at the preemption sync point of a
        multi-process run: Orbax asks JAX) and not saved yet; returns whether a save started."""
        if step in self.manager.all_steps():
            return False
        if not self.frozen:
            state = state.replace(frozen={})
        return self.manager.save(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state)}), force=force)

    def restore(self, step: int, abstract_state):
        """Restores the state onto `abstract_state`'s shardings (its `frozen` left {} with `frozen=False`)."""
        if not self.frozen:
            abstract_state = abstract_state.replace(frozen={})
        return self.manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_state)}))[STATE]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


CONFIG_FILE = "config.json"  # a run's resolved training config, written by the trainer at its start


def is_run_dir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "checkpoints"))


def saved_steps(run_dir: str) -> list[int]:
    """The complete checkpoint steps of a run, oldest first."""
    directory = os.path.join(os.path.abspath(run_dir), "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(ocp.path.step.checkpoint_steps(directory))  # a read-only manager warns three times


@dataclasses.dataclass(frozen=True)
class RunDir:
    """A training run's directory (its checkpoints in PATH/checkpoints), its config.json read once
    (`RunDir.open`): what export, loading, the loop and a resumed run ask of a run."""

    path: str  # absolute
    config: dict  # the resolved training config (config.json)
    model_path: str  # the Hugging Face folder it trained from (model.path): architecture, tokenizer, processor

    @classmethod
    def open(cls, path: str) -> RunDir:
        path = os.path.abspath(path)
        file = os.path.join(path, CONFIG_FILE)
        try:
            with open(file) as f:
                config = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{file}: missing (the trainer writes it at start; is this a run directory?)") \
                from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from e
        return cls(path, config, config["model"]["path"])

    @classmethod
    def resumable(cls, path: str) -> RunDir | None:
        """The run in `path` when a restart there resumes it (a complete checkpoint and its config.json),
        else None."""
        if not saved_steps(path) or not os.path.isfile(os.path.join(path, CONFIG_FILE)):
            return None
        return cls.open(path)

    @property
    def lora(self):
        """Its adapters' settings (`lora.LoRASettings`), or None for a full fine-tuning run."""
        from rdpo_jax.models.lora import LoRASettings

        return LoRASettings.from_config(self.config.get("lora") or {})

    def base(self) -> dict:
        """A LoRA run's base (`base.json`): {"source": HF folder or run directory, "step": a run's step or None,
        "identity": …}."""
        return read_base(self.path)

    @property
    def scan_layers(self) -> str:
        """The layer layout of its checkpoints (`model.scan_layers`; "off" for runs older than the field)."""
        return self.config["model"].get("scan_layers", "off")

    def steps(self) -> list[int]:
        """Its complete checkpoint steps, oldest first (read each time: a running trainer adds them)."""
        return saved_steps(self.path)


BASE_FILE = "base.json"  # a LoRA run's base model: its adapters mean nothing on another


def base_identity(source: str, step: int | None) -> dict:
    """What names a LoRA run's base: an HF folder's config.json and weight files' names and sizes, or a run
    directory and its step (cheap to check at every resume, unlike a content hash of the weights)."""
    source = os.path.abspath(source)
    if is_run_dir(source):
        return {"source": source, "step": step}
    files = {name: os.path.getsize(os.path.join(source, name)) for name in sorted(os.listdir(source))
             if name == "config.json" or name.endswith((".safetensors", ".safetensors.index.json"))}
    return {"source": source, "step": None, "files": files}


def write_base(workdir: str, identity: dict) -> None:
    os.makedirs(workdir, exist_ok=True)
    file = os.path.join(workdir, BASE_FILE)
    with open(file + ".tmp", "w") as f:
        json.dump(identity, f, indent=2)
    os.replace(file + ".tmp", file)


def read_base(workdir: str) -> dict:
    file = os.path.join(os.path.abspath(workdir), BASE_FILE)
    try:
        with open(file) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{file}: missing (a LoRA run writes it at its start: it names the base model)") \
            from None


def write_config(workdir: str, config_json: str) -> None:
    """WORKDIR/config.json, replaced whole (a reader never sees half of it)."""
    os.makedirs(workdir, exist_ok=True)
    file = os.path.join(workdir, CONFIG_FILE)
    with open(file + ".tmp", "w") as f:
        f.write(config_json)
    os.replace(file + ".tmp", file)


def restore_params(run_dir: str, abstract_params: dict, step: int | None = None) -> tuple[dict, int]:
    """Every parameter of a run's checkpoint at `step` (default: the latest), trainable or frozen there,
    in the tree of `abstract_params` (a nested dict of ShapeDtypeStruct with `.sharding`), placed on its
    shardings and cast to its dtypes. Returns (params, step). Neither optimizer state nor reference
    is read."""
    directory = os.path.join(os.path.abspath(run_dir), "checkpoints")
    steps = saved_steps(run_dir)
    if not steps:
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint (looked in {directory})")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(f"{run_dir}: no checkpoint for step {step}; saved steps: {steps}")
    path = os.path.join(directory, str(step), STATE)
    # the item's tree, read by its handler: the checkpointer looks for step metadata in the item's folder
    # (it is one level up) and warns
    saved = ocp.PyTreeCheckpointHandler().metadata(epath.Path(path))
    with ocp.PyTreeCheckpointer() as reader:
        target, restore_args = {}, {}
        for part in ("params", "frozen"):
            tree = saved.get(part) or {}
            target[part] = jax.tree_util.tree_map_with_path(
                lambda kp, _: optim.tree_get(abstract_params, kp, run_dir), tree)
            restore_args[part] = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype),
                                              target[part])
        restored = reader.restore(path, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                                                    partial_restore=True))
    # each parameter is in the saving run's `params` or `frozen` (its freeze patterns): looked up by its path
    saved_leaves = {optim.path_str(kp): x for part in ("params", "frozen")
                    for kp, x in jax.tree_util.tree_flatten_with_path(restored.get(part) or {})[0]}

    def find(kp, _):
        name = optim.path_str(kp)
        if name not in saved_leaves:
            raise ValueError(f"{run_dir}: parameter {name} is in one model but not the other (a different "
                             "architecture, or model.scan_layers: stacked vs per-layer parameters?)")
        return saved_leaves[name]

    return jax.tree_util.tree_map_with_path(find, abstract_params), step


def load_model(source: str | RunDir, run=None, *, mesh=None, step: int | None = None,
               model_path: str | None = None, merge: bool = True):
    """A model from a Hugging Face folder or from a run's checkpoint at `step` (default: the latest;
    its parameters on the architecture of the run's model.path, or of `model_path` when given), with
    `run` (`RunSettings`: dtypes, remat, placeholder check; default float32) on `mesh` (default: the
    first local device). Returns (model, model_config, model_folder, step or None).

    A LoRA run's model is its base (loaded as `run` says, unquantized) with its adapters folded in
    (`lora.merge`), or with `merge=False` the adapters kept apart on the base. With `run.lora`, the model
    loaded is a base: fresh adapters are attached to it (and it is quantized as they say)."""
    from flax import nnx

    from rdpo_jax import sharding, train_step
    from rdpo_jax.models import config as config_lib
    from rdpo_jax.models import families, hf, lora

    run = run or config_lib.RunSettings()
    if not isinstance(source, RunDir) and not is_run_dir(source):
        model, cfg = hf.load_hf(source, run, mesh=mesh)
        return model, cfg, source, None
    run_dir = source if isinstance(source, RunDir) else RunDir.open(source)
    folder = model_path or run_dir.model_path
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{run_dir.path}: the run's model folder {folder!r} (model.path in its config.json) "
                                "has no config.json; pass the folder explicitly (export: --model_path)")
    if mesh is None:
        mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.local_devices()[:1])
    settings = run_dir.lora
    if settings is not None:
        base = run_dir.base()
        model, cfg, _, _ = load_model(base["source"], dataclasses.replace(run, lora=None, scan_layers=run_dir.scan_layers),
                                      mesh=mesh, step=base["step"], model_path=folder)
        model = families.adapt(model, dataclasses.replace(settings, quantize=""))
        adapters, step = restore_params(run_dir.path, train_step.abstract_params(model, mesh, nnx.LoRAParam), step)
        nnx.update(model, adapters)
        if not merge:
            return model, cfg, folder, step
        model = lora.merge(model)
    else:
        cfg = hf.read_config(folder)
        # the checkpoint holds the parameters in the run's layer layout (stacked when its layers were scanned)
        abstract = families.abstract_model(cfg, dataclasses.replace(run, scan_layers=run_dir.scan_layers, lora=None))
        params, step = restore_params(run_dir.path, train_step.abstract_params(abstract, mesh), step)
        model = nnx.merge(nnx.graphdef(abstract), params)
    # `run.lora`: fresh adapters on this model as its base (as hf.load_hf gives them)
    return (model if run.lora is None else families.adapt(model, run.lora)), cfg, folder, step


def reference_model(config) -> str:
    """A training config's reference: `dpo.reference_from` if set, else its initial model (model.path for
    init_from="model", else init_from: an HF folder or a run's workdir)."""
    if config.dpo.reference_from:
        return config.dpo.reference_from
    return config.model.path if config.init_from == "model" else config.init_from


def fingerprint(source: str) -> str:
    """Names the model that computed reference log-likelihoods: a content hash of a Hugging Face
    folder, or a run's path and checkpoint step (`ref_fingerprint` in pair records)."""
    import hashlib

    from rdpo_jax.models import hf

    if is_run_dir(source):
        steps = saved_steps(source)
        step = steps[-1] if steps else None
        return "run:" + hashlib.sha256(f"{os.path.abspath(source)}:{step}".encode()).hexdigest()[:32]
    return hf.fingerprint(source)
