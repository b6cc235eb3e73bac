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
processes (`pipeline.agree_seq_len`), eval passes are padded to whole global batches, and logged counts
are summed over processes.
"""

from __future__ import annotations

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

from rdpo_jax import checkpoint, config_checks, logs, optim, packing, sharding, train_step
from rdpo_jax.data import arrayrecord, images, pipeline, records
from rdpo_jax.data.tokenize import ChatTokenizer
from rdpo_jax.models import config as model_config
from rdpo_jax.models import hf

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config (configs/NAME.py[:ARG]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, resolved config.")


def main(argv):
    del argv
    config, workdir = _CONFIG.value, _WORKDIR.value
    if config is None or not workdir:
        raise app.UsageError("--config and --workdir are required")
    if "://" in workdir:
        raise app.UsageError(f"--workdir={workdir}: expected a filesystem path (metrics, logs and checkpoints are "
                             "written with file APIs); mount the bucket with gcsfuse (launch/tpu_vm.sh mount) and "
                             "pass the mounted path")
    if not flags.FLAGS["verbosity"].present:  # orbax and grain log every save at INFO
        logging.set_verbosity(logging.WARNING)

    cache = compile_cache_dir(config.checkpoint.compile_cache, workdir, os.environ)
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
    cache_hits = _count_cache_hits()

    # ----- Devices and mesh -----
    _init_distributed(config.distributed)
    mesh = sharding.make_mesh(config_checks.validate(config, num_devices=jax.device_count(),
                                                     num_processes=jax.process_count()))
    primary = jax.process_index() == 0
    if primary:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    # ----- Model and optimizer -----
    dtypes = model_config.DTYPES
    model_cfg = hf.read_config(config.model.path, param_dtype=dtypes[config.model.param_dtype],
                               dtype=dtypes[config.model.dtype], remat=config.model.remat,
                               check_image_tokens=False)  # ChatTokenizer checks them; keeps the step cacheable
    freeze = config_checks.patterns(config.optim.freeze, "optim.freeze")
    o = config.optim
    schedule = optim.learning_rate_schedule(learning_rate=o.learning_rate, schedule=o.schedule,
                                            warmup_steps=o.warmup_steps, total_steps=config.total_steps,
                                            end_lr_factor=o.end_lr_factor)
    optimizer = optim.make_optimizer(
        learning_rate=schedule, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps, grad_clip=o.grad_clip,
        lr_multipliers=config_checks.multipliers(o.lr_multipliers, "optim.lr_multipliers"))
    dpo = config.objective == "dpo"
    online_reference = dpo and config.dpo.reference == "model"
    graphdef, abstract = train_step.abstract_state(model_cfg, optimizer, mesh, freeze=freeze,
                                                   reference=online_reference)

    # ----- Data: global batch s is a pure function of (data.seed, s) -----
    kind = "pairs" if dpo else "sft"
    fingerprint = None
    if dpo and config.dpo.reference == "precomputed":
        fingerprint = _reference_fingerprint(config)
    options = pipeline.Options.from_config(config, reference_fingerprint=fingerprint)
    if fingerprint is not None:
        _check_reference_data(config.data.train, kind, options)
    tokenizer = ChatTokenizer(config.model.path, image_token_id=model_cfg.image_token_id,
                              image_seq_len=model_cfg.image_seq_len)
    image_cfg = images.image_config(config.model.path) if config.data.images_per_example else None
    source = _source(config.data.train, kind)
    dataset = pipeline.make_dataset(source, options, tokenizer, image_cfg, global_batch_size=config.data.batch_size,
                                    seed=config.data.seed)

    # ----- State: restore order -----
    checkpointer = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), every=config.checkpoint.every,
                                           keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    latest = checkpointer.latest_step()
    t0 = time.perf_counter()
    if latest is not None:
        state = checkpointer.restore(latest, abstract)
        origin = f"checkpoint {latest} of {workdir}"
    else:
        state, origin = _initial_state(config, model_cfg, graphdef, abstract, optimizer, mesh, freeze,
                                       online_reference)
    jax.block_until_ready(state)
    restore_s = time.perf_counter() - t0
    start = int(state.step)
    iterator = pipeline.make_iterator(dataset[start:], workers=config.data.workers, buffer_size=config.data.buffer)
    n_params = sum(x.size for x in jax.tree.leaves((state.params, state.frozen)))
    trainable = sum(x.size for x in jax.tree.leaves(state.params))
    _print(f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices, "
           f"{jax.process_count()} process(es); {n_params:,} parameters ({trainable:,} trainable); "
           f"state from {origin} in {restore_s:.1f}s; step {start}/{config.total_steps}")

    # ----- Compile (one program per length bucket), memory analysis -----
    if dpo:
        d = config.dpo
        loss_fn = train_step.dpo_loss(graphdef, loss_type=d.loss_type, beta=d.beta, label_smoothing=d.label_smoothing,
                                      gamma=d.gamma, length_norm=d.length_norm, sft_weight=d.sft_weight,
                                      pair_layout=d.pair_layout, reference=d.reference)
    else:
        loss_fn = train_step.sft_loss(graphdef)
    rows = packing.rows_per_pair(config.dpo.pair_layout) if dpo else 1
    step_fn = train_step.make_step(loss_fn, optimizer, schedule, accum_steps=config.accum_steps, rows_per_example=rows)
    first = next(iterator)
    compiled, batch_shardings = {}, {}
    for seq_len in config.data.seq_buckets:
        spec = _global_spec(first["batch"], seq_len)
        batch_shardings[seq_len] = train_step.batch_shardings(spec, mesh)
        t0, hits = time.perf_counter(), cache_hits["n"]
        compiled[seq_len] = train_step.jit_step(step_fn, abstract, spec, mesh).lower(abstract, spec).compile()
        m = compiled[seq_len].memory_analysis()
        cached = " (from the compilation cache)" if cache_hits["n"] > hits else ""
        _print(f"compiled the {config.objective} step for rows of {seq_len} tokens in {time.perf_counter() - t0:.1f}s"
               f"{cached}; "
               f"memory per device: arguments {_mib(m.argument_size_in_bytes)}, outputs "
               f"{_mib(m.output_size_in_bytes)}, temporaries {_mib(m.temp_size_in_bytes)}, aliased "
               f"{_mib(m.alias_size_in_bytes)}")
    evaluator = None
    if config.data.eval:
        eval_data = pipeline.make_dataset(_source(config.data.eval, kind), options, tokenizer, image_cfg,
                                          global_batch_size=config.data.batch_size, seed=0, num_epochs=1)
        evaluator = _Evaluator(jax.jit(sharding.traced_on(mesh, train_step.make_eval_step(loss_fn))), eval_data,
                               mesh, tokenizer.pad_id, config.eval.batches)

    # ----- Train -----
    logger = logs.MetricLogger(workdir, total_steps=config.total_steps, start_step=start,
                               tensorboard=config.log.tensorboard)
    preempted = threading.Event()
    if jax.process_count() == 1:
        # Multi-process runs leave SIGTERM to JAX's preemption service (installed by jax.distributed.initialize),
        # which agrees on one step for every process to save at; a Python handler would replace it.
        signal.signal(signal.SIGTERM, lambda *_: preempted.set())
    window = _Window()
    step, element, pending, streak = start, first, None, 0
    while step < config.total_steps:
        element = element or next(iterator)
        local = pipeline.agree_seq_len(element["batch"], tokenizer.pad_id)
        seq_len = local["input_ids"].shape[1]
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            state, metrics = compiled[seq_len](state, pipeline.to_global(local, batch_shardings[seq_len]))
        step += 1
        window.add_data(element)
        if pending is not None:  # read the previous step's metrics while this one runs
            streak = _check_finite(pending, streak, config.optim.max_nonfinite, source)
            window.add_metrics(pending[1])
        pending, element = (step, metrics, element["index"]), None
        if step % config.log.every == 0 or step == config.total_steps:
            streak = _check_finite(pending, streak, config.optim.max_nonfinite, source)
            window.add_metrics(pending[1])
            pending = None
            values = window.flush()
            logger.write(step, values)
            logger.progress(step, {k: values[k] for k in ("loss", "pairs_per_s", "tokens_per_s") if k in values})
        if evaluator and config.eval.every and step % config.eval.every == 0 and step < config.total_steps:
            logger.write(step, evaluator(state), prefix="eval/")
        checkpointer.save(step, state)
        if _stop_requested(preempted, step):
            checkpointer.save(step, state, force=True)
            print(f"SIGTERM: saved step {step}; restart the same command to resume", flush=True)  # every process
            break
    else:
        if evaluator:
            logger.write(step, evaluator(state), prefix="eval/")
        t0 = time.perf_counter()
        checkpointer.save(step, state, force=True)
        checkpointer.wait()
        _print(f"finished step {step}; final checkpoint written in {time.perf_counter() - t0:.1f}s")
    checkpointer.wait()
    checkpointer.close()
    logger.close()
    if hasattr(iterator, "close"):
        iterator.close()


# ----- helpers (kept here: they read the config and serve only this loop) -----

def _print(text: str) -> None:
    if jax.process_index() == 0:
        print(text, flush=True)


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


def _init_distributed(d) -> None:
    if d.coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU multi-process collectives
        jax.distributed.initialize(coordinator_address=d.coordinator, num_processes=d.num_processes,
                                   process_id=d.process_id)
    elif d.auto:
        jax.distributed.initialize()


def _stop_requested(preempted: threading.Event, step: int) -> bool:
    if jax.process_count() > 1:  # every process must agree on the step at which to stop
        return multihost_utils.reached_preemption_sync_point(step)
    return preempted.is_set()


def _source(spec: str, kind: str):
    """"folder/NAME" (ArrayRecord + manifest) or "tfds:NAME/CONFIG:SPLIT[@DATA_DIR]"."""
    if spec.startswith("tfds:"):
        from rdpo_jax.data import tfds_source

        name, _, rest = spec[len("tfds:"):].partition(":")
        split, _, data_dir = rest.partition("@")
        return tfds_source.TfdsSource(name, split=split or "train", data_dir=data_dir or None, kind=kind)
    return arrayrecord.Source(spec, kind)


def _reference_fingerprint(config) -> str:
    return checkpoint.fingerprint(checkpoint.reference_model(config))


def _check_reference_data(spec: str, kind: str, options: pipeline.Options) -> None:
    """Fails before compiling when the first record's reference log-likelihoods are absent or were
    computed by another model or with other settings (the pipeline checks every record again)."""
    source = _source(spec, kind)
    record = records.decode(source[0][1], kind, source.where(0))
    if "ref_chosen_logp" not in record:
        raise config_checks.ConfigError(
            f"config.dpo.reference: 'precomputed', but {source.where(0)} of {spec} has no ref_chosen_logp: "
            "compute them first (data_prep.ref_logps) or use reference='model'")
    problem = pipeline.reference_mismatch(record, options)
    if problem and problem[0] == "ref_fingerprint":
        raise config_checks.ConfigError(
            f"config.dpo.reference: the reference log-likelihoods in {spec} come from "
            f"{record.get('ref_fingerprint')!r}, but this run's reference (its initial model) is "
            f"{options.reference_fingerprint!r}")
    if problem:
        raise config_checks.ConfigError(f"{problem[1]} ({source.where(0)} of {spec})")


def _initial_state(config, model_cfg, graphdef, abstract, optimizer, mesh, freeze, reference):
    """Restore-order steps 2 and 3: parameters from init_from, fresh optimizer state."""
    init = config.init_from
    if init == "scratch":
        return train_step.fresh_state(model_cfg, optimizer, mesh, freeze=freeze, reference=reference,
                                      seed=config.seed)[1], f"a fresh init (seed {config.seed})"
    if checkpoint.is_run_dir(init):
        full = train_step.abstract_state(model_cfg, optimizer, mesh, reference=False)[1].params
        params, step = checkpoint.restore_params(init, full)
        model = nnx.merge(train_step.abstract_state(model_cfg, optimizer, mesh)[0], params, {})
        origin = f"the parameters of {init} (step {step})"
    else:
        path = config.model.path if init == "model" else init
        model, loaded_cfg = hf.load_hf(path, mesh=mesh, dtype=model_cfg.param_dtype, compute_dtype=model_cfg.dtype,
                                       remat=model_cfg.remat, check_image_tokens=model_cfg.check_image_tokens)
        if loaded_cfg != model_cfg:
            raise config_checks.ConfigError(f"config.init_from: {path} holds a different architecture than "
                                            f"model.path {config.model.path}")
        origin = f"the Hugging Face weights in {path}"
    _, state = train_step.init_state(model, optimizer, freeze=freeze, reference=reference)
    return jax.device_put(state, jax.tree.map(lambda x: x.sharding, abstract)), origin


def _global_spec(local: dict, seq_len: int) -> dict:
    """The global batch's shapes for one length bucket, from one local batch."""
    def spec(k, v):
        shape = (v.shape[0] * jax.process_count(), *v.shape[1:])
        if k in ("input_ids", "positions", "branch_ids"):
            shape = (shape[0], seq_len)
        return jax.ShapeDtypeStruct(shape, v.dtype)
    return {k: spec(k, v) for k, v in local.items()}


class _Window:
    """Host-side sums between two log writes: step metrics, throughput, data counts (cumulative). The
    data counts are this process's; `flush` sums them over processes (one small all-gather per log line)."""

    def __init__(self):
        self.metrics, self.steps = {}, 0
        self.data: dict[str, int] = {"examples": 0, "tokens": 0}
        self.counts: dict[str, int] = {}
        self.t0 = time.perf_counter()

    def add_data(self, element: dict) -> None:
        self.data["examples"] += int(element["stats"]["examples"])
        self.data["tokens"] += int((element["batch"]["branch_ids"] >= 0).sum())
        for k, v in element["stats"].items():
            if k.startswith("skipped/") or k.startswith("truncated"):
                self.counts[k] = self.counts.get(k, 0) + int(v)

    def add_metrics(self, metrics: dict) -> None:
        for k, v in jax.device_get(metrics).items():
            self.metrics[k] = self.metrics.get(k, 0.0) + float(v)
        self.steps += 1

    def flush(self) -> dict[str, float]:
        names = sorted(self.data) + sorted(self.counts)  # the same keys on every process: batches share them
        totals = dict(zip(names, _sum_over_processes([{**self.data, **self.counts}[k] for k in names])))
        elapsed = time.perf_counter() - self.t0
        out = {k: v / max(self.steps, 1) for k, v in self.metrics.items()}
        out.update(pairs_per_s=totals["examples"] / elapsed, tokens_per_s=totals["tokens"] / elapsed,
                   step_s=elapsed / max(self.steps, 1), **{k: float(totals[k]) for k in self.counts})
        self.metrics, self.steps, self.data = {}, 0, {"examples": 0, "tokens": 0}
        self.t0 = time.perf_counter()
        return out


def _sum_over_processes(values: list[int]) -> list[int]:
    if jax.process_count() == 1:
        return values
    gathered = multihost_utils.process_allgather(np.asarray(values, np.int32))  # [processes, len(values)]
    return [int(v) for v in np.asarray(gathered).reshape(jax.process_count(), -1).sum(0)]


class _Evaluator:
    """Held-out metrics over the first `max_batches` batches of one fixed pass (seed 0) of the eval
    data, built once. Every process runs the same number of steps (the pass is padded to whole global
    batches) with the same row length per step."""

    def __init__(self, eval_step, dataset, mesh, pad_id: int, max_batches: int):
        self.eval_step, self.dataset, self.mesh, self.pad_id = eval_step, dataset, mesh, pad_id
        self.batches = min(max_batches, len(dataset))

    def __call__(self, state) -> dict[str, float]:
        sums: dict[str, list[float]] = {}
        for i in range(self.batches):
            local = pipeline.agree_seq_len(self.dataset[i]["batch"], self.pad_id)
            spec = _global_spec(local, local["input_ids"].shape[1])
            batch = pipeline.to_global(local, train_step.batch_shardings(spec, self.mesh))
            with jax.profiler.StepTraceAnnotation("eval", step_num=i):
                out = jax.device_get(self.eval_step(state, batch))
            for name, (s, n) in out.items():
                total = sums.setdefault(name, [0.0, 0.0])
                total[0] += float(s)
                total[1] += float(n)
        return {"examples": sums["loss"][1], **{name: s / max(n, 1.0) for name, (s, n) in sums.items()}}


def _check_finite(pending, streak: int, limit: int, source) -> int:
    step, metrics, index = pending
    if float(jax.device_get(metrics["nonfinite"])) == 0:
        return 0
    streak += 1
    _print(f"step {step}: non-finite loss or gradients; update skipped ({streak} in a row)")
    if streak >= limit:
        names = ", ".join(source.where(int(i)) for i in np.asarray(index) if i >= 0)
        raise SystemExit(f"stopping at step {step}: {streak} consecutive steps with a non-finite loss or gradients "
                         f"(optim.max_nonfinite={limit}); the last batch held records {names}")
    return streak


if __name__ == "__main__":
    app.run(main)
