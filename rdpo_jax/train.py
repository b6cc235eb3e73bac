"""Training entry point: `python -m rdpo_jax.train --config=configs/NAME.py[:ARG] --workdir=DIR`.

SFT or DPO on a ("data", "fsdp", "tensor") mesh, single- or multi-process. Where the parameters come
from, in order:
  1. this workdir's latest complete checkpoint (state, optimizer, reference; the data position is the
     step: global batch s is a function of (data.seed, s), whatever the number of processes);
  2. `init_from`: "model" (the weights in model.path), an HF folder, or another run's workdir
     (its parameters only);
  3. `init_from="scratch"`: a fresh init from `seed`.
Restarting the same command resumes exactly; SIGTERM (TPU preemption) saves the current step and exits
— on multi-process runs through JAX's preemption service, so that every process saves the same step.
Every process runs the same program on every step: the length bucket of each batch is agreed by all
processes (`pipeline.agree_shapes`), eval passes are padded to whole global batches, and logged counts
are summed over processes. A global batch with no valid record (all skipped, `data.on_bad_record="skip"`)
updates nothing: parameters, optimizer state and schedule stay, the data position moves on; such steps are
counted (`empty_batches`) and printed.

With precomputed reference log-likelihoods (`dpo.reference="precomputed"`) whose reference is the initial
policy, a fresh run compares, at its first step with a valid pair, the batch's precomputed values with the
policy's own (from the train step itself, before any update) and stops beyond
`train_step.REFERENCE_TOLERANCE` (0.25 + 0.02·n nats for an answer of n tokens), naming the pair and both
values: the data was computed by another model or with other settings, or written into the wrong record.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time

import jax
import numpy as np
from absl import app, flags, logging
from flax import nnx
from jax.experimental import multihost_utils
from ml_collections import config_flags

from rdpo_jax import checkpoint, config_checks, logs, optim, sharding, train_step
from rdpo_jax.data import arrayrecord, pipeline, records
from rdpo_jax.data.tokenize import ChatTokenizer
from rdpo_jax.models import config as model_config
from rdpo_jax.models import families, hf, image_inputs

KILL_AT_STEP_ENV = "RDPO_TEST_KILL_AT_STEP"  # testing only: SIGKILL after this step once saves are written (loop tests)
CONFIG = config_flags.DEFINE_config_file("config", None, "Training config (configs/NAME.py[:ARG]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, resolved config.")


def main(argv):
    del argv
    config, workdir = CONFIG.value, _WORKDIR.value
    _check_flags(config, workdir)
    cache_hits = _use_compile_cache(config, workdir)

    # ----- Devices and mesh -----
    sharding.init_distributed(config.distributed)
    mesh = sharding.make_mesh(config_checks.validate(config, num_devices=jax.device_count(),
                                                     num_processes=jax.process_count()))

    # ----- Model, optimizer, the abstract train state -----
    setup = Setup(config, mesh)
    setup.claim(workdir)  # the layer layout checked against the run resumed; config.json written

    # ----- Data: global batch s is a pure function of (data.seed, s) -----
    data = _Data(config, setup)

    # ----- State: this workdir's checkpoint, else init_from -----
    checkpointer = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), every=config.checkpoint.every,
                                           keep=config.checkpoint.keep, async_save=config.checkpoint.async_save,
                                           frozen=setup.run.lora is None)  # a LoRA run's base is not saved
    state = setup.restore_or_init(checkpointer, workdir)
    start = int(state.step)
    iterator = pipeline.make_iterator(data.dataset[start:], workers=config.data.workers, buffer_size=config.data.buffer)
    setup.report_sharding(workdir)

    # ----- Compile: one program per (row length, patch buffer) bucket, memory analysis -----
    steps = setup.steps()
    first = next(iterator)
    compiled = _Compiled(setup, steps.train, first["batch"], cache_hits)
    compiled.every_row_bucket(data)
    evaluator = None
    if config.data.eval:
        evaluator = _Evaluator(jax.jit(sharding.traced_on(mesh, steps.eval)), data.eval_dataset(), mesh,
                               config.eval.batches)

    # ----- Train -----
    checking = start == 0 and setup.precomputed_reference and _reference_is_initial(config)
    logger = logs.MetricLogger(workdir, total_steps=config.total_steps, start_step=start,
                               tensorboard=config.log.tensorboard)
    preempted = _on_sigterm()
    window = _Window(config.optim.max_nonfinite, data.source)
    profiler = _Profiler(config.log.profile_steps, os.path.join(workdir, "profile"))
    step, element = start, first
    kill_at = int(os.environ.get(KILL_AT_STEP_ENV) or 0)
    while step < config.total_steps:
        element = element or next(iterator)
        local = pipeline.agree_shapes(element["batch"])
        step_fn, shardings = compiled(local.sizes())
        profiler.before(step + 1)
        with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):
            state, metrics = step_fn(state, pipeline.to_global(local, shardings))
        step += 1
        if checking:  # until a batch with a valid pair was compared (an empty step updates nothing)
            checking = _check_reference(step, metrics["reference_check"], element, local, data.source)
        window.add(step, metrics, element, local)  # device arrays: fetched when the window is written
        profiler.after(step, metrics)
        element = None
        if _itstime(step, config.log.every, config.total_steps):
            values = window.flush()  # stops the run on a streak of non-finite steps
            logger.write(step, values)
            logger.progress(step, {k: values[k] for k in ("loss", "pairs_per_s", "tokens_per_s") if k in values})
        if evaluator and _itstime(step, config.eval.every, config.total_steps):
            logger.write(step, evaluator(state), prefix="eval/")
        checkpointer.save(step, state, force=step == config.total_steps)
        if step == kill_at:  # testing only: a crash right after this step, its checkpoints written
            checkpointer.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        if _stop_requested(preempted, step):
            checkpointer.save(step, state, force=True)
            print(f"SIGTERM: saved step {step}; restart the same command to resume", flush=True)  # every process
            break
    else:
        t0 = time.perf_counter()
        checkpointer.wait()
        _print(f"finished step {step}; final checkpoint written in {time.perf_counter() - t0:.1f}s")
    profiler.close()
    checkpointer.wait()
    checkpointer.close()
    logger.close()
    if hasattr(iterator, "close"):
        iterator.close()


# ----- helpers (kept here: they read the config and serve only this loop) -----

def _print(text: str) -> None:
    if jax.process_index() == 0:
        print(text, flush=True)


def _check_flags(config, workdir: str) -> None:
    """--config and --workdir given, the workdir a filesystem path; orbax and grain quiet (they log every
    save at INFO) unless --verbosity says otherwise."""
    if config is None or not workdir:
        raise app.UsageError("--config and --workdir are required")
    if "://" in workdir:
        raise app.UsageError(f"--workdir={workdir}: expected a filesystem path (metrics, logs and checkpoints are "
                             "written with file APIs); mount the bucket with gcsfuse (launch/tpu_vm.sh mount) and "
                             "pass the mounted path")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def _use_compile_cache(config, workdir: str) -> dict[str, int]:
    """Points JAX at the persistent compilation cache (`compile_cache_dir`); returns the count of its hits."""
    cache = compile_cache_dir(config.checkpoint.compile_cache, workdir, os.environ)
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
    return _count_cache_hits()


def compile_cache_dir(setting: str, workdir: str, environ) -> str | None:
    """The persistent compilation cache folder: JAX_COMPILATION_CACHE_DIR if set (JAX reads it itself),
    else `checkpoint.compile_cache` ("workdir" = WORKDIR/compile_cache, a folder, or "" = off)."""
    if environ.get("JAX_COMPILATION_CACHE_DIR"):
        return environ["JAX_COMPILATION_CACHE_DIR"]
    if not setting:
        return None
    return os.path.join(workdir, "compile_cache") if setting == "workdir" else setting


def _count_cache_hits() -> dict[str, int]:
    """A counter of JAX's persistent-cache hits, read around each compile to say where the step came from."""
    hits = {"n": 0}

    def listen(event: str, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            hits["n"] += 1

    jax.monitoring.register_event_listener(listen)
    return hits


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _on_sigterm() -> threading.Event:
    """An event SIGTERM sets. Multi-process runs leave SIGTERM to JAX's preemption service (installed by
    jax.distributed.initialize), which agrees on one step for every process to save at; a Python handler
    would replace it."""
    preempted = threading.Event()
    if jax.process_count() == 1:
        signal.signal(signal.SIGTERM, lambda *_: preempted.set())
    return preempted


def _stop_requested(preempted: threading.Event, step: int) -> bool:
    if jax.process_count() > 1:  # every process must agree on the step at which to stop
        return multihost_utils.reached_preemption_sync_point(step)
    return preempted.is_set()


def _source(spec: str, options: pipeline.Options, field: str = "data.train"):
    """"folder/NAME" (ArrayRecord + manifest) or "tfds:NAME/CONFIG:SPLIT[@DATA_DIR]", holding records of a
    kind the objective trains (dpo: pairs or groups, sft: sft)."""
    if spec.startswith("tfds:"):
        from rdpo_jax.data import tfds_source

        name, _, rest = spec[len("tfds:"):].partition(":")
        split, _, data_dir = rest.partition("@")
        return tfds_source.TfdsSource(name, split=split or "train", data_dir=data_dir or None, kind=options.kind)
    source = arrayrecord.Source(spec)
    try:
        pipeline.source_kind(source, options)
    except ValueError as e:
        raise config_checks.ConfigError(f"config.{field}: {e}") from None
    return source


def _check_reference_data(spec: str, options: pipeline.Options) -> None:
    """Fails before compiling when the first record's reference log-likelihoods are absent or were
    computed by another model or with other settings (the pipeline checks every record again)."""
    source = _source(spec, options)
    record = records.decode(source[0][1], source.kind, source.where(0))
    first = records.pairs_of_group(record)[0] if source.kind == "groups" else record
    if "ref_chosen_logp" not in first:
        raise config_checks.ConfigError(
            f"config.dpo.reference: 'precomputed', but {source.where(0)} of {spec} has no ref_chosen_logp: "
            "compute them first (data_prep.ref_logps) or use reference='model'")
    problem = pipeline.reference_mismatch(record, options)
    if problem and problem[0] == "ref_fingerprint":
        raise config_checks.ConfigError(
            f"config.dpo.reference: the reference log-likelihoods in {spec} come from "
            f"{record.get('ref_fingerprint')!r}, but this run's reference (dpo.reference_from, else its initial model) is "
            f"{options.reference_fingerprint!r}")
    if problem:
        raise config_checks.ConfigError(f"{problem[1]} ({source.where(0)} of {spec})")


def _reference_is_initial(config) -> bool:
    """Whether the run's reference model is its initial policy: then, before the first update, the policy's
    log-likelihoods are the reference's."""
    initial = config.model.path if config.init_from == "model" else config.init_from
    reference = checkpoint.reference_model(config)
    if reference == initial:
        return True
    return initial != "scratch" and checkpoint.fingerprint(reference) == checkpoint.fingerprint(initial)


def _check_reference(step: int, check: dict, element: dict, local: dict, source) -> bool:
    """Stops the run when the first batch's precomputed reference log-likelihoods are not the initial
    policy's own (`check`: the step's `reference_check`, the same on every process), naming the pair and
    both values. Returns whether to check the next step too (this batch had no valid pair)."""
    check = jax.device_get(check)
    if float(check["ratio"]) < 0:
        return True
    floor, per_token = train_step.REFERENCE_TOLERANCE
    if float(check["ratio"]) <= 1.0:
        _print(f"step {step}: the precomputed reference log-likelihoods are the initial policy's (the furthest pair at "
               f"{float(check['ratio']):.2g} of the tolerance, {floor} + {per_token}·tokens nats)")
        return False
    (pc, pr), (rc, rr), (nc, nr) = (np.asarray(check[k], np.float64) for k in ("policy", "reference", "tokens"))
    raise SystemExit(
        f"stopping at step {step}: {_pair_name(int(check['slot']), element, local, source)} carries reference "
        f"log-likelihoods that are not this run's initial policy's, which is its reference: chosen {rc:.4f} "
        f"(the policy: {pc:.4f}, {nc:.0f} tokens), rejected {rr:.4f} (the policy: {pr:.4f}, {nr:.0f} tokens); "
        f"at most {floor} + {per_token}·tokens nats apart before the first update. They were computed by another "
        "model or with other settings, or written into another record: compute them again with "
        "data_prep.ref_logps and this run's config")


def _pair_name(slot: int, element: dict, local: dict, source) -> str:
    """'pair PAIR_ID (FILE[INDEX])' for a flat pair slot of the global batch's `valid` [units, slots]."""
    units, slots = local.valid.shape
    index = np.asarray(element["index"]).reshape(len(element["index"]), -1)
    index = np.concatenate([index, np.full((units - len(index), index.shape[1]), -1, index.dtype)])
    if jax.process_count() > 1:  # the global batch holds the processes' rows in process order
        index = np.asarray(multihost_utils.process_allgather(index)).reshape(-1, index.shape[1])
    unit, slot = divmod(slot, slots)
    per_record = slots // index.shape[1]
    i, pair = int(index[unit, slot // per_record]), slot % per_record
    record = records.decode(source[i][1], source.kind, source.where(i))
    if source.kind == "groups":
        record = records.pairs_of_group(record)[pair]
    return f"pair {record.get('pair_id')!r} ({source.where(i)})"


def _check_layer_layout(workdir: str, setup: Setup) -> None:
    """Refuses to resume a run whose checkpoints hold the other layer layout: `model.scan_layers` decides
    whether layers' parameters are stacked or one per layer."""
    resumed = checkpoint.RunDir.resumable(workdir)
    if resumed is None or resumed.scan_layers == setup.run.scan_layers:
        return

    def param_paths(model):
        return {p for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}

    saved = families.abstract_model(setup.model_config, dataclasses.replace(setup.run, scan_layers=resumed.scan_layers))
    if param_paths(saved) != param_paths(setup.abstract_model):
        raise config_checks.ConfigError(
            f"config.model.scan_layers: {setup.run.scan_layers!r}, but the checkpoints in {workdir} were written with "
            f"{resumed.scan_layers!r} (the other layer layout: stacked vs per-layer parameters); resume with "
            f"--config.model.scan_layers={resumed.scan_layers}")


class Setup:
    """The model side of a run, built once from the config: architecture and run settings, the DPO settings,
    optimizer and schedule, frozen patterns, the abstract model (shapes, dtypes, logical axes) and the
    abstract train state (shapes and target shardings on `mesh`) that restores, loads and fresh inits all
    fill."""

    def __init__(self, config, mesh):
        self.config, self.mesh = config, mesh
        self.model_config = hf.read_config(config.model.path)
        self.run = model_config.RunSettings.from_config(config)
        self.freeze = config_checks.patterns(config.optim.freeze, "optim.freeze")
        o = config.optim
        self.schedule = optim.learning_rate_schedule(
            learning_rate=o.learning_rate, schedule=o.schedule, warmup_steps=o.warmup_steps,
            total_steps=config.total_steps, end_lr_factor=o.end_lr_factor)
        self.optimizer = optim.make_optimizer(
            learning_rate=self.schedule, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
            grad_clip=o.grad_clip, lr_multipliers=config_checks.multipliers(o.lr_multipliers, "optim.lr_multipliers"))
        self.dpo = config_checks.dpo_settings(config) if config.objective == "dpo" else None
        self.abstract_model = families.abstract_model(self.model_config, self.run)
        self.graphdef, self.abstract = train_step.abstract_state(
            self.abstract_model, self.optimizer, mesh, freeze=self.freeze,
            reference=self.dpo is not None and self.dpo.reference == "model")

    @property
    def precomputed_reference(self) -> bool:
        """Whether the reference log-likelihoods come with the data (`dpo.reference="precomputed"`)."""
        return self.dpo is not None and self.dpo.reference == "precomputed"

    def claim(self, workdir: str) -> None:
        """Makes `workdir` this run's: refuses to resume checkpoints of the other layer layout, then, once
        every process has read the old config.json, the primary writes this config there."""
        _check_layer_layout(workdir, self)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("rdpo_jax.train: layer layout checked")
        if jax.process_index() == 0:
            checkpoint.write_config(workdir, self.config.to_json_best_effort(indent=2))

    def restore_or_init(self, checkpointer: checkpoint.Checkpointer, workdir: str) -> train_step.TrainState:
        """The state to start from: the latest checkpoint of `checkpointer` (this workdir's), else
        `initial_state`; says where it came from and in how long, over which mesh."""
        latest = checkpointer.latest_step()
        t0 = time.perf_counter()
        if latest is not None:
            state, origin = checkpointer.restore(latest, self.abstract), f"checkpoint {latest} of {workdir}"
            if self.run.lora is not None:  # the adapters were saved, not the base they sit on
                base = self._resumed_base(workdir)
                params, _, _ = self._adapted(base["source"], "init_from", base["step"])
                state = train_step.with_frozen(state, params, self.abstract)
                origin += f" on the base {base['source']}"
        else:
            state, origin = self.initial_state(workdir)
        jax.block_until_ready(state)
        restore_s = time.perf_counter() - t0
        n_params = sum(x.size for x in jax.tree.leaves((state.params, state.frozen)))
        trainable = sum(x.size for x in jax.tree.leaves(state.params))
        _print(f"mesh {dict(self.mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices, "
               f"{jax.process_count()} process(es); {n_params:,} parameters ({trainable:,} trainable); "
               f"state from {origin} in {restore_s:.1f}s; step {int(state.step)}/{self.config.total_steps}")
        return state

    def initial_state(self, workdir: str):
        """The state of a run without a checkpoint: the parameters of `init_from` ("model": model.path's
        weights, an HF folder, another run's latest checkpoint, or "scratch": a fresh init from `seed`), a
        fresh optimizer and, for an online reference, its copy (of `dpo.reference_from` when set). A LoRA
        run's base is `init_from` (a LoRA run there merged: the loop's rounds stack) with fresh adapters,
        named in WORKDIR/base.json. Returns (state, where the parameters came from)."""
        config = self.config
        if self.run.lora is not None:
            params, origin, identity = self._adapted(config.init_from, "init_from")
            if jax.process_index() == 0:
                checkpoint.write_base(workdir, identity)
        else:
            params, origin = self._parameters(config.init_from, "init_from")
        reference = None
        if self.abstract.ref_params is not None and config.dpo.reference_from:
            reference, ref_origin = self._parameters(config.dpo.reference_from, "dpo.reference_from")
            origin += f"; reference: {ref_origin}"
        try:
            return train_step.new_state(params, self.optimizer, self.abstract, reference), origin
        except ValueError as e:
            raise config_checks.ConfigError(f"config.dpo.reference_from: {e}") from None

    def _parameters(self, source: str, field: str) -> tuple[dict, str]:
        """Every parameter of `source` ("scratch", "model", an HF folder or a run's workdir) as a nested
        dict, and a phrase naming where they came from."""
        config = self.config
        if source == "scratch":
            model = families.create(self.model_config, self.run, mesh=self.mesh, seed=config.seed)
            return nnx.to_pure_dict(nnx.state(model, nnx.Param)), f"a fresh init (seed {config.seed})"
        if checkpoint.is_run_dir(source):
            params, step = checkpoint.restore_params(source, train_step.abstract_params(self.abstract_model, self.mesh))
            return params, f"the parameters of {source} (step {step})"
        path = config.model.path if source == "model" else source
        model, loaded = hf.load_hf(path, self.run, mesh=self.mesh)
        if loaded != self.model_config:
            raise config_checks.ConfigError(f"config.{field}: {path} holds a different architecture than "
                                            f"model.path {config.model.path}")
        return nnx.to_pure_dict(nnx.state(model, nnx.Param)), f"the Hugging Face weights in {path}"

    def _adapted(self, source: str, field: str, step: int | None = None) -> tuple[dict, str, dict]:
        """Every parameter of the base `source` ("model", an HF folder, or a run's workdir at `step`, default
        its latest) with fresh adapters (from `seed`), a phrase naming it, and its `checkpoint.base_identity`."""
        config = self.config
        path = config.model.path if source == "model" else source
        model, cfg, _, step = checkpoint.load_model(path, dataclasses.replace(self.run, lora=None), mesh=self.mesh,
                                                    step=step, model_path=config.model.path)
        if cfg != self.model_config:
            raise config_checks.ConfigError(f"config.{field}: {path} holds a different architecture than "
                                            f"model.path {config.model.path}")
        model = families.adapt(model, self.run.lora, seed=config.seed)
        at = "" if step is None else f" (step {step})"
        return (nnx.to_pure_dict(nnx.state(model, nnx.Param)), f"the base {path}{at} with fresh rank-"
                f"{self.run.lora.rank} adapters", checkpoint.base_identity(path, step))

    def _resumed_base(self, workdir: str) -> dict:
        """The base a resumed LoRA run started on (WORKDIR/base.json), checked to be unchanged."""
        base = checkpoint.read_base(workdir)
        now = checkpoint.base_identity(base["source"], base["step"])
        if now != base:
            raise config_checks.ConfigError(
                f"{workdir}: its adapters were trained on {base['source']} as {base}, but that is now {now}: "
                "restore the base model, or start a new run")
        return base

    def steps(self) -> train_step.Steps:
        c = self.config
        dropout_seed = c.seed if self.run.lora is not None and self.run.lora.dropout else None
        if self.dpo is None:
            return train_step.make_sft_step(self.graphdef, self.optimizer, self.schedule, accum_steps=c.accum_steps,
                                            dropout_seed=dropout_seed)
        return train_step.make_dpo_step(self.graphdef, self.optimizer, self.schedule, self.dpo,
                                        accum_steps=c.accum_steps, dropout_seed=dropout_seed)

    def report_sharding(self, workdir: str) -> None:
        """Every parameter's shape, dtype and sharding to WORKDIR/parameters.txt; a console line for each
        dimension the mesh could have split but did not (it stays whole on every device)."""
        table, unsplit = sharding.overview(nnx.state(self.abstract_model, nnx.Param), self.mesh)
        if jax.process_index() != 0:
            return
        with open(os.path.join(workdir, "parameters.txt"), "w") as f:
            f.write("\n".join(table) + "\n")
        for line in unsplit:
            print(f"not sharded: {line}", flush=True)


class _Data:
    """The training data, opened once: the source (records of a kind the objective trains), the pipeline's
    options, tokenizer and image inputs, and the dataset of global batches. With precomputed reference
    log-likelihoods, the first record is checked against this run's reference before anything compiles."""

    def __init__(self, config, setup: Setup):
        self.config = config
        fingerprint = None
        if setup.precomputed_reference:
            fingerprint = checkpoint.fingerprint(checkpoint.reference_model(config))
        self.options = pipeline.Options.from_config(config, reference_fingerprint=fingerprint)
        if fingerprint is not None:
            _check_reference_data(config.data.train, self.options)
        self.tokenizer = ChatTokenizer(config.model.path, image_token_id=setup.model_config.image_token_id)
        self.image_input = image_inputs.from_config(config, setup.model_config)
        self.source = _source(config.data.train, self.options)
        if len(self.source) == 0:
            raise config_checks.ConfigError(f"config.data.train: {config.data.train} holds no records: nothing to "
                                            "train on")
        self.dataset = pipeline.make_dataset(self.source, self.options, self.tokenizer, self.image_input,
                                             global_batch_size=config.data.batch_size, seed=config.data.seed)

    def target_width(self, seq_len: int) -> int:
        """Trained tokens per row of a batch of rows of `seq_len` tokens."""
        return self.options.target_width(seq_len, pipeline.source_kind(self.source, self.options))

    def eval_dataset(self):
        """One fixed pass (seed 0) over `data.eval`, in global batches."""
        c = self.config
        return pipeline.make_dataset(_source(c.data.eval, self.options, "data.eval"), self.options, self.tokenizer,
                                     self.image_input, global_batch_size=c.data.batch_size, seed=0, num_epochs=1)


class _Compiled:
    """The train step compiled for each batch shape (`Batch.sizes()`: units, row length, trained tokens per
    row, patches) as batches first need it, with the shardings of such a batch; each compile printed with
    its time and memory analysis. `batch`: a batch of this process's, the template of the others."""

    def __init__(self, setup: Setup, step_fn, batch, cache_hits: dict[str, int]):
        self.setup, self.step_fn, self.batch, self.cache_hits = setup, step_fn, batch, cache_hits
        self.programs: dict[tuple[int, int, int, int], tuple] = {}

    def __call__(self, shape: tuple[int, int, int, int]):
        """(the compiled step, the batch's shardings) for batches of `shape`."""
        if shape not in self.programs:
            setup = self.setup
            spec = self.batch.global_shapes(*shape, processes=jax.process_count())
            t0, hits = time.perf_counter(), self.cache_hits["n"]
            compiled = train_step.jit_step(self.step_fn, setup.abstract, spec, setup.mesh).lower(
                setup.abstract, spec).compile()
            m = compiled.memory_analysis()
            flops = (compiled.cost_analysis() or {}).get("flops", 0.0)  # XLA's count, per device
            cached = " (from the compilation cache)" if self.cache_hits["n"] > hits else ""
            patches = f" and {shape[3]} patches" if shape[3] else ""
            _print(f"compiled the {setup.config.objective} step for {spec.input_ids.shape[0]} rows of {shape[1]} "
                   f"tokens{patches} in "
                   f"{time.perf_counter() - t0:.1f}s{cached}; memory per device: arguments "
                   f"{_mib(m.argument_size_in_bytes)}, outputs {_mib(m.output_size_in_bytes)}, temporaries "
                   f"{_mib(m.temp_size_in_bytes)}, aliased {_mib(m.alias_size_in_bytes)}; XLA counts "
                   f"{flops / 1e9:.1f} GFLOP per device and step")
            self.programs[shape] = compiled, spec.shardings(setup.mesh)
        return self.programs[shape]

    def every_row_bucket(self, data: _Data) -> None:
        """Every row bucket up front, with the largest patch bucket (the most memory each can take); smaller
        patch buckets, and packed batches needing more rows, compile when a batch first needs them."""
        d = self.setup.config.data
        largest_patches = max(d.patch_buckets) if "patches" in self.batch.images else 0
        rows = len(self.batch.valid)
        for seq_len in d.seq_buckets:
            self((rows, seq_len, data.target_width(seq_len), largest_patches))


def _itstime(step: int, every: int, total_steps: int) -> bool:
    """A periodic action's turn: every `every` steps (0: none) and at the last step."""
    return step == total_steps or (every > 0 and step % every == 0)


class _Window:
    """What happened between two log writes. Step metrics stay on the devices until `flush`, which
    fetches them all at once, averages them over the steps that trained (`empty_batches` counts the
    others), sums throughput and data counts over processes (one small all-gather) and stops the run when
    the step's own streak count (`nonfinite_streak`) reached `max_nonfinite`, naming that batch's records."""

    def __init__(self, max_nonfinite: int, source):
        self.max_nonfinite, self.source = max_nonfinite, source
        self.steps: list[tuple[int, dict, np.ndarray]] = []  # (step, device metrics, record indices)
        self.data: dict[str, int] = {"examples": 0, "tokens": 0, "token_slots": 0}
        self.counts: dict[str, int] = {}
        self.t0 = time.perf_counter()

    def add(self, step: int, metrics: dict, element: dict, batch: dict) -> None:
        """`batch`: this process's part of the batch the step ran (padded to the agreed shapes)."""
        self.steps.append((step, metrics, element["index"]))
        self.data["examples"] += int(element["stats"]["examples"])
        self.data["tokens"] += int((batch.branch_ids >= 0).sum())
        self.data["token_slots"] += batch.branch_ids.size
        if "patch_image" in batch.images:  # how much of the patch buffers is padding
            self.data["patches"] = self.data.get("patches", 0) + int((batch.images["patch_image"] >= 0).sum())
            self.data["patch_slots"] = self.data.get("patch_slots", 0) + batch.images["patch_image"].size
        for k, v in element["stats"].items():
            if k.startswith("skipped/") or k.startswith("truncated"):
                self.counts[k] = self.counts.get(k, 0) + int(v)

    def flush(self) -> dict[str, float]:
        fetched = jax.device_get([m for _, m, _ in self.steps])
        empty = [step for (step, _, _), m in zip(self.steps, fetched) if float(m["empty"])]
        if empty:
            _print(f"steps {', '.join(str(s) for s in empty)}: no valid record in the global batch (all skipped as "
                   "bad, see skipped/*); nothing updated")
        self._check_finite(fetched)
        names = sorted(self.data) + sorted(self.counts)  # the same keys on every process: batches share them
        totals = dict(zip(names, _sum_over_processes([{**self.data, **self.counts}[k] for k in names])))
        elapsed = time.perf_counter() - self.t0
        n = max(len(fetched), 1)
        # means over the steps that trained: an empty batch's loss and rewards measure nothing
        trained = [m for m in fetched if not float(m["empty"])] or [{"lr": fetched[-1]["lr"]}]
        out = {k: sum(float(m[k]) for m in trained) / len(trained) for k in trained[0]
               if k not in ("nonfinite_streak", "empty", "reference_check")}
        out.update(empty_batches=float(len(empty)), pairs_per_s=totals["examples"] / elapsed,
                   tokens_per_s=totals["tokens"] / elapsed, step_s=elapsed / n,
                   **{k: float(totals[k]) for k in self.counts})
        out["token_padding"] = 1.0 - totals["tokens"] / max(totals["token_slots"], 1)
        if totals.get("patch_slots"):
            out["patch_padding"] = 1.0 - totals["patches"] / totals["patch_slots"]
        self.steps, self.data = [], {"examples": 0, "tokens": 0, "token_slots": 0}
        self.t0 = time.perf_counter()
        return out

    def _check_finite(self, fetched: list[dict]) -> None:
        skipped = [(step, int(m["nonfinite_streak"])) for (step, _, _), m in zip(self.steps, fetched)
                   if float(m["nonfinite"])]
        if skipped:
            _print(f"steps {', '.join(str(s) for s, _ in skipped)}: non-finite loss or gradients; update skipped "
                   f"({skipped[-1][1]} in a row at step {skipped[-1][0]})")
        for (step, _, index), m in zip(self.steps, fetched):
            if int(m["nonfinite_streak"]) >= self.max_nonfinite:
                names = ", ".join(self.source.where(int(i)) for i in np.asarray(index).ravel() if i >= 0)
                raise SystemExit(f"stopping at step {step}: {self.max_nonfinite} consecutive steps with a non-finite "
                                 f"loss or gradients (optim.max_nonfinite={self.max_nonfinite}); the last batch held "
                                 f"records {names}")


class _Profiler:
    """A `jax.profiler` trace of steps first..last (`log.profile_steps = (first, last)`; () = off) into
    WORKDIR/profile, for TensorBoard's profile plugin or Perfetto (every process writes its host's part)."""

    def __init__(self, steps, directory: str):
        self.window = tuple(int(s) for s in steps) if steps else None
        if self.window is not None and (len(self.window) != 2 or not 1 <= self.window[0] <= self.window[1]):
            raise config_checks.ConfigError(f"config.log.profile_steps: {steps!r}; expected (first, last) with "
                                            "1 <= first <= last, or () for none")
        self.directory, self.active = directory, False

    def before(self, step: int) -> None:
        if self.window is not None and step == self.window[0] and not self.active:
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after(self, step: int, metrics) -> None:
        if self.active and step >= self.window[1]:
            jax.block_until_ready(metrics)  # the trace holds the last step whole
            self.close()

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            _print(f"profile of steps {self.window[0]}..{self.window[1]} written to {self.directory}")


def _sum_over_processes(values: list[int]) -> list[int]:
    if jax.process_count() == 1:
        return values
    gathered = multihost_utils.process_allgather(np.asarray(values, np.int32))  # [processes, len(values)]
    return [int(v) for v in np.asarray(gathered).reshape(jax.process_count(), -1).sum(0)]


class _Evaluator:
    """Held-out metrics over the first `max_batches` batches of one fixed pass (seed 0) of the eval
    data, built once. Every process runs the same number of steps (the pass is padded to whole global
    batches) with the same row length per step."""

    def __init__(self, eval_step, dataset, mesh, max_batches: int):
        self.eval_step, self.dataset, self.mesh = eval_step, dataset, mesh
        self.batches = min(max_batches, len(dataset))

    def __call__(self, state) -> dict[str, float]:
        sums: dict[str, list[float]] = {}
        for i in range(self.batches):
            local = pipeline.agree_shapes(self.dataset[i]["batch"])
            spec = local.global_shapes(*local.sizes(), processes=jax.process_count())
            batch = pipeline.to_global(local, spec.shardings(self.mesh))
            with jax.profiler.StepTraceAnnotation("eval", step_num=i):
                out = jax.device_get(self.eval_step(state, batch))
            for name, (s, n) in out.items():
                total = sums.setdefault(name, [0.0, 0.0])
                total[0] += float(s)
                total[1] += float(n)
        return {"examples": sums["loss"][1], **{name: s / max(n, 1.0) for name, (s, n) in sums.items()}}


if __name__ == "__main__":
    app.run(main)
