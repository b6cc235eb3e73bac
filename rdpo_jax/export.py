"""Export a run's checkpoint as a Hugging Face folder: `python -m rdpo_jax.export --workdir=DIR --out=HF_DIR`.

    python -m rdpo_jax.export --workdir=runs/dpo --out=exports/dpo            # latest step, run's dtype
    python -m rdpo_jax.export --workdir=runs/dpo --step=2000 --dtype=bfloat16 --out=exports/dpo-2000

Reads the parameters only (no optimizer state, no reference) onto an FSDP mesh of the devices present,
then writes what `transformers` loads: `config.json`, safetensors (sharded with
`model.safetensors.index.json` above --max_shard_size), `generation_config.json`, the tokenizer,
processor and chat-template files of the run's base model folder, and a `README.md` model card.

The folder is written next to --out under a temporary name and renamed when complete, so an
interrupted export never leaves a half-written model. On a multi-host slice run it on every worker with
--distributed_auto (each process gathers its shards; process 0 writes), or on one host whose devices
hold the model.

A LoRA run exports the same way with its adapters merged into the base; with --adapters_only it is written as
a PEFT LoRA folder instead (`models/peft_io.py`: `adapter_config.json`, `adapter_model.safetensors`, the base's
tokenizer and processor files, a card), which `peft.PeftModel.from_pretrained` loads onto the base:

    python -m rdpo_jax.export --workdir=runs/lora --adapters_only --out=exports/lora-adapter \
        --base_model=Qwen/Qwen2.5-VL-3B-Instruct   # what the adapter names as its base (default: the run's base folder)
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
from absl import app, flags, logging
from flax import nnx

from rdpo_jax import checkpoint, sharding, train_step
from rdpo_jax.models import config as model_config
from rdpo_jax.models import families, hf, peft_io

# Files of the base model folder that are not copied: the weights and config we write ourselves.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
_NOT_COPIED = {"config.json", "README.md", "generation_config.json"}


def parse_size(text: str) -> int:
    """'5GB' -> 5 * 10**9, '500MiB' -> 500 * 2**20, '1234' -> 1234 (bytes)."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    t = text.strip().lower()
    for unit, factor in units.items():
        if t.endswith(unit) and t[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(t[: -len(unit)]) * factor)
    if t.isdigit():
        return int(t)
    raise ValueError(f"--max_shard_size={text!r}: expected a size such as 5GB, 500MB, 2GiB or a byte count")


def export(workdir: str, out: str, *, step: int | None = None, dtype: str | None = None, overwrite: bool = False,
           max_shard_bytes: int = 5 * 10**9, model_path: str | None = None) -> dict:
    """Writes the checkpoint of `workdir` at `step` as a Hugging Face folder `out` (a LoRA run's adapters merged
    into its base). Every process of a multi-process job calls this; process 0 writes. Returns a summary (step,
    dtype, files, base folder)."""
    run = _open_run(workdir, out, step, overwrite)
    dtype = dtype or run.config["model"].get("param_dtype", "float32")
    model, _, folder, step = checkpoint.load_model(
        run, model_config.RunSettings(param_dtype=model_config.DTYPES[dtype]), mesh=_mesh(), step=step,
        model_path=model_path)
    hf_config = hf.read_hf_config(folder)
    with _staging(out) as staging:
        files = hf.save_hf(model, staging, hf_config, dtype=jnp.dtype(dtype), max_shard_bytes=max_shard_bytes)
        if staging:
            files += _copy_tokenizer_files(folder, staging)
            files.append(_write_generation_config(folder, hf_config, staging))
            files.append(_write_card(staging, model_card(
                run.config, workdir=workdir, step=step, dtype=dtype, base=folder, metrics=_last_metrics(workdir, step),
                architecture=families.get(hf_config.model_type).architecture)))
    return {"step": step, "dtype": dtype, "files": sorted(files), "model_path": folder}


def export_adapters(workdir: str, out: str, *, step: int | None = None, overwrite: bool = False,
                    model_path: str | None = None, base_model: str | None = None) -> dict:
    """Writes the adapters of the LoRA run `workdir` at `step` as a PEFT LoRA folder `out` over its base, named
    in `adapter_config.json` as `base_model` (default: the run's base folder), with the base's tokenizer and
    processor files and a card. Only the adapters are read, not the base's weights. Every process of a
    multi-process job calls this; process 0 writes. Returns a summary (step, files, base folder, base_model)."""
    run = _open_run(workdir, out, step, overwrite)
    settings = run.lora
    if settings is None:
        raise ValueError(f"--workdir={workdir}: a full fine-tuning run (lora.rank 0) has no adapters; export the "
                         "whole model (without --adapters_only)")
    base = run.base()
    if base_model is None and checkpoint.is_run_dir(base["source"]):
        raise ValueError(f"--workdir={workdir}: its base is the run {base['source']} (step {base['step']}), which "
                         "PEFT cannot load; export that run as a Hugging Face folder and name it with --base_model")
    base_model = base_model or base["source"]
    folder = model_path or run.model_path
    cfg = hf.read_config(folder)
    # the run's adapters on an abstract base: shapes and names, no base weights read
    model = families.abstract_model(cfg, model_config.RunSettings(
        scan_layers=run.scan_layers, lora=dataclasses.replace(settings, quantize="")))
    adapters, step = checkpoint.restore_params(run.path, train_step.abstract_params(model, _mesh(), nnx.LoRAParam),
                                               step)
    nnx.update(model, adapters)
    with _staging(out) as staging:
        files = peft_io.save_adapters(model, staging, base_model_name_or_path=base_model, settings=settings)
        if staging:
            files += _copy_tokenizer_files(folder, staging)
            files.append(_write_card(staging, model_card(
                run.config, workdir=workdir, step=step, dtype="float32", base=base_model,
                metrics=_last_metrics(workdir, step), architecture=families.of(cfg).architecture, adapter=settings)))
    return {"step": step, "files": sorted(files), "model_path": folder, "base_model": base_model}


def _open_run(workdir: str, out: str, step: int | None, overwrite: bool) -> checkpoint.RunDir:
    """The run to export, after checking the paths and that it has a checkpoint at `step`."""
    for flag, path in (("--workdir", workdir), ("--out", out)):
        if "://" in path:
            raise ValueError(f"{flag}={path}: expected a filesystem path; mount the bucket with gcsfuse")
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"--workdir={workdir}: no such directory")
    if not checkpoint.is_run_dir(workdir):
        raise FileNotFoundError(f"--workdir={workdir}: not a training run (no checkpoints/ directory)")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not overwrite:
        raise FileExistsError(f"--out={out} exists and is not empty; pass --overwrite to replace it")
    run = checkpoint.RunDir.open(workdir)
    steps = run.steps()
    if not steps:
        raise FileNotFoundError(f"--workdir={workdir}: no complete checkpoint to export")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"--step={step}: {workdir} has no checkpoint for it; saved steps: {steps}")
    return run


def _mesh() -> jax.sharding.Mesh:
    return sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})


@contextlib.contextmanager
def _staging(out: str):
    """On process 0 a folder next to `out` to write into, renamed to `out` (replacing it) when the block ends
    and removed if it raises, so that an interrupted export never leaves a half-written folder; "" elsewhere."""
    if jax.process_index() != 0:
        yield ""
        return
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.partial-", dir=parent)
    try:
        yield staging
        if os.path.exists(out):
            shutil.rmtree(out) if os.path.isdir(out) else os.remove(out)
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_card(folder: str, card: str) -> str:
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(card)
    return "README.md"


def _copy_tokenizer_files(base: str, out: str) -> list[str]:
    """Tokenizer, processor and chat-template files (everything but weights, config and card)."""
    copied = []
    for name in sorted(os.listdir(base)):
        src = os.path.join(base, name)
        if (not os.path.isfile(src) or name.startswith(".") or name in _NOT_COPIED
                or name.endswith(_WEIGHT_SUFFIXES)):
            continue
        shutil.copy2(src, os.path.join(out, name))
        copied.append(name)
    return copied


def _write_generation_config(base: str, hf_config, out: str) -> str:
    """The base folder's generation config, or one with the tokenizer's special tokens and the
    end-of-turn token (what the sampler stops at) as end of sequence."""
    import transformers

    if os.path.isfile(os.path.join(base, "generation_config.json")):
        generation = transformers.GenerationConfig.from_pretrained(base)
    else:
        text = hf_config.text_config
        generation = transformers.GenerationConfig(bos_token_id=getattr(text, "bos_token_id", None),
                                                   eos_token_id=getattr(text, "eos_token_id", None),
                                                   pad_token_id=getattr(text, "pad_token_id", None))
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(base)
        except (OSError, ValueError):
            tokenizer = None
        if tokenizer is not None:
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                if getattr(tokenizer, key, None) is not None:
                    setattr(generation, key, getattr(tokenizer, key))
    generation.save_pretrained(out)
    return "generation_config.json"


def _last_metrics(workdir: str, step: int) -> dict:
    """The last logged training and eval metrics at or before `step`."""
    path = os.path.join(workdir, "metrics.jsonl")
    train, evaluation = {}, {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill; the card is informational
                if record.get("step", 0) > step:
                    continue
                if "loss" in record:
                    train = record
                if "eval/loss" in record:
                    evaluation = record
    keep = ("step", "loss", "rewards/accuracies", "rewards/margins", "rubric/essential_agreement",
            "rubric/additional_agreement", "grad_norm", "lr")
    out = {k: train[k] for k in keep if k in train}
    out.update({k: v for k, v in evaluation.items() if k.startswith("eval/")})
    return out


def model_card(run: dict, *, workdir: str, step: int, dtype: str, base: str, metrics: dict, architecture: str,
               adapter=None) -> str:
    """A README.md with the Hub's front matter, the training summary, metrics and a usage snippet: of the
    model, or with `adapter` (the run's `lora.LoRASettings`) of a PEFT LoRA adapter over the base `base`."""
    get = lambda *keys: _get(run, keys)  # noqa: E731
    objective = get("objective")
    rows = [("objective", objective)]
    if objective == "dpo":
        rows += [(f"dpo.{k}", get("dpo", k)) for k in ("loss_type", "beta", "label_smoothing", "gamma",
                                                     "reference", "pair_layout", "sft_weight")]
    rows += [("step exported / total_steps", f"{step} / {get('total_steps')}"),
             ("data.train", get("data", "train")), ("data.batch_size", get("data", "batch_size")),
             ("data.seq_buckets", get("data", "seq_buckets")),
             ("optim.learning_rate", get("optim", "learning_rate")), ("optim.schedule", get("optim", "schedule")),
             ("optim.warmup_steps", get("optim", "warmup_steps")),
             ("optim.weight_decay", get("optim", "weight_decay")), ("optim.freeze", get("optim", "freeze")),
             ("optim.lr_multipliers", get("optim", "lr_multipliers")),
             ("mesh (data, fsdp, tensor)", (get("mesh", "data"), get("mesh", "fsdp"), get("mesh", "tensor"))),
             ("model.param_dtype / dtype", f"{get('model', 'param_dtype')} / {get('model', 'dtype')}"),
             ("exported weight dtype", dtype), ("seed", get("seed"))]
    if adapter is not None:
        rows += [("lora.rank / alpha", f"{adapter.rank} / {adapter.alpha}"),
                 ("lora.targets", ", ".join(adapter.targets))]
    cell = lambda v: str(v).replace("|", "\\|")  # noqa: E731  (a regex's alternatives would end the cell)
    table = "\n".join(f"| {k} | `{cell(v)}` |" for k, v in rows if v not in (None, "", "None"))
    metric_rows = "\n".join(f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |"
                            for k, v in metrics.items())
    name = os.path.basename(os.path.abspath(workdir))
    today = datetime.date.today().isoformat()
    loss = f", loss `{get('dpo', 'loss_type')}`" if objective == "dpo" else ""
    imports = "from transformers import AutoModelForImageTextToText, AutoProcessor"
    if adapter is None:
        front, title, tags = "library_name: transformers\n", f"{name} (step {step})", ("rdpo_jax", objective)
        what = (f"A vision-language model (`{architecture}`) post-trained with rdpo_jax — objective "
                f"`{objective}`{loss} — starting from\nthe model folder `{base}`.")
        use = (f'model = AutoModelForImageTextToText.from_pretrained("PATH/TO/THIS/FOLDER")  # a {architecture}\n'
               'processor = AutoProcessor.from_pretrained("PATH/TO/THIS/FOLDER")')
    else:  # the Hub takes `base_model` as a model id, not a local folder
        front = "library_name: peft\n" + ("" if os.path.isabs(base) else f"base_model: {base}\n")
        title, tags = f"{name} (step {step}, LoRA adapter)", ("rdpo_jax", objective, "lora")
        what = (f"A PEFT LoRA adapter (rank {adapter.rank}, alpha {adapter.alpha}) over `{base}` (`{architecture}`), "
                f"post-trained\nwith rdpo_jax — objective `{objective}`{loss}.")
        use = (f'model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained("{base}"),\n'
               '                                  "PATH/TO/THIS/FOLDER")  # model.merge_and_unload(): plain weights\n'
               'processor = AutoProcessor.from_pretrained("PATH/TO/THIS/FOLDER")')
        imports = "from peft import PeftModel  # peft >= 0.20\n" + imports
    tag_lines = "".join(f"- {t}\n" for t in (*tags, "vision-language"))
    return f"""---
{front}pipeline_tag: image-text-to-text
tags:
{tag_lines}---

# {title}

{what} Exported from the run `{workdir}` at step {step} on {today}.

## Training

| setting | value |
|---|---|
{table}

## Last logged metrics (step ≤ {step})

| metric | value |
|---|---|
{metric_rows or "| (none logged) | |"}

## Use

```python
{imports}

{use}
```

<details><summary>Full training config</summary>

```json
{json.dumps(run, indent=2, sort_keys=True)}
```
</details>
"""


def _get(tree: dict, keys: tuple):
    for k in keys:
        if not isinstance(tree, dict) or k not in tree:
            return None
        tree = tree[k]
    return tree


def _define_flags() -> None:
    """The command's flags (defined only when run as a command, so importing `export` defines none)."""
    flags.DEFINE_string("workdir", None, "The training run's directory.")
    flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
    flags.DEFINE_string("out", None, "Hugging Face folder to write.")
    flags.DEFINE_enum("dtype", None, ["bfloat16", "float32", "float16"],
                      "Weight dtype on disk (default: the run's model.param_dtype).")
    flags.DEFINE_bool("overwrite", False, "Replace --out when it exists and is not empty.")
    flags.DEFINE_string("max_shard_size", "5GB", "Largest safetensors file, e.g. 5GB or 500MB.")
    flags.DEFINE_string("model_path", None, "The base model folder when the run's recorded model.path has moved.")
    flags.DEFINE_bool("adapters_only", False, "A LoRA run's adapters as a PEFT LoRA folder, not merged into its base.")
    flags.DEFINE_string("base_model", None, "With --adapters_only: the base the adapter names (adapter_config.json's "
                        "base_model_name_or_path), e.g. a Hub id; default: the run's base folder.")
    flags.DEFINE_bool("distributed_auto", False, "Call jax.distributed.initialize() (multi-host slices).")


def main(argv):
    del argv
    f = flags.FLAGS
    if not f.workdir or not f.out:
        raise app.UsageError("--workdir and --out are required")
    if not f["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if f.adapters_only and f.dtype:
        raise app.UsageError("--dtype: adapters are written in float32, as trained (--dtype is for the merged export)")
    if f.base_model and not f.adapters_only:
        raise app.UsageError("--base_model names the base of an adapter: pass --adapters_only")
    if f.distributed_auto:
        jax.distributed.initialize()
    if f.adapters_only:
        summary = export_adapters(f.workdir, f.out, step=f.step, overwrite=f.overwrite, model_path=f.model_path,
                                  base_model=f.base_model)
        what = f"as a PEFT LoRA adapter over {summary['base_model']}"
    else:
        summary = export(f.workdir, f.out, step=f.step, dtype=f.dtype, overwrite=f.overwrite,
                         max_shard_bytes=parse_size(f.max_shard_size), model_path=f.model_path)
        what = f"as {summary['dtype']}"
    if jax.process_index() == 0:
        print(f"exported {f.workdir} step {summary['step']} {what} to {f.out}: {', '.join(summary['files'])}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
