"""The Grain input pipeline: records → tokenized, preprocessed, packed batches → global jax.Arrays.

    source → shuffle(seed, reshuffled per epoch) → repeat → global batches of B records, of which
    this process takes rows [p·B/n, (p+1)·B/n) → Prepare (decode, validate, images, tokenize) →
    batch + Collate (pack into a length bucket, images into the family's arrays, pad) → worker
    processes → `agree_shapes` (every process pads to the longest buckets any process needs) →
    `to_global`

Images go through the model family's `image_inputs` adapter: it preprocesses each record's images,
says how many placeholder tokens each becomes (the tokenizer expands the template's image token to
that many) and, for M-RoPE families, the prompt's 3D positions; a batch's images become the arrays the
model reads (LLaVA: pixels [B, N, H, W, 3]; Qwen2.5-VL: a patch buffer per row from a patch bucket).
Records may hold 0 … `max_images` images.

Everything before the worker processes is a `grain.MapDataset`, i.e. indexed: global batch `s` is a
pure function of (seed, s), independent of the number of processes, devices and workers, so the data
position of a run is its step (`dataset[step:]` resumes it, also on a slice of another size). A finite
pass (`num_epochs=1`, evaluation) gives every process the same number of batches: the last global batch
is padded with invalid rows.

Bad records (`on_bad_record="skip"`) keep their slot as a padding example (`valid` = 0) and are counted
by reason in the batch's `stats`, so counts survive worker processes and never shift later batches;
`"error"` raises a RecordError naming the file, the index in it and the field.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np

from rdpo_jax import packing
from rdpo_jax.data import image_inputs, images, records
from rdpo_jax.data.tokenize import ChatTokenizer, TemplateError

SKIP_REASONS = ("corrupt", "schema", "bad_image", "image_count", "image_budget", "empty_answer", "identical_answers",
                "scores_mismatch", "too_many_criteria", "template", "prompt_too_long", "missing_reference",
                "reference_mismatch")
ON_BAD_RECORD = ("error", "skip")
PAD_ROW = (-1, b"")  # a row past the end of a finite pass (the last global batch is padded with it)


@dataclasses.dataclass(frozen=True)
class Options:
    """What turns records into batches: built from the run's config by `from_config` (the trainer,
    ref_logps and every command that reads training data use that one definition)."""
    kind: str  # "pairs" | "sft"
    seq_buckets: tuple[int, ...]  # padded row lengths; a batch uses the smallest that fits
    max_answer_len: int  # each answer is cut to this many tokens (counted)
    max_criteria: int = 16  # rubric arrays are padded to this K
    essential_weight: float = 1.0
    additional_weight: float = 1.0
    pair_layout: str = "shared_prefix"
    require_reference: bool = False  # records must carry ref_chosen_logp / ref_rejected_logp …
    reference_fingerprint: str | None = None  # … computed by this reference model …
    reference_settings: tuple[tuple[str, Any], ...] | None = None  # … with these settings (else a RecordError)
    on_bad_record: str = "error"

    def __post_init__(self):
        if self.kind not in ("pairs", "sft"):
            raise ValueError(f"data kind {self.kind!r}: training reads 'pairs' or 'sft' records")
        if self.on_bad_record not in ON_BAD_RECORD:
            raise ValueError(f"on_bad_record {self.on_bad_record!r} is not one of {ON_BAD_RECORD}")
        if not self.seq_buckets or list(self.seq_buckets) != sorted(set(self.seq_buckets)):
            raise ValueError(f"seq_buckets must be increasing, got {self.seq_buckets}")
        packing.rows_per_pair(self.pair_layout)

    @classmethod
    def from_config(cls, config, *, reference_fingerprint: str | None = None) -> Options:
        """The options of a training config (`rdpo_jax/configs/*.py`). With `reference_fingerprint` (a run with
        `dpo.reference="precomputed"`), records must carry reference log-likelihoods of that model,
        stamped with this config's `reference_settings`."""
        d, dpo = config.data, config.objective == "dpo"
        return cls(kind="pairs" if dpo else "sft", seq_buckets=tuple(d.seq_buckets), max_answer_len=d.max_answer_len,
                   max_criteria=d.max_criteria,
                   essential_weight=d.essential_weight, additional_weight=d.additional_weight,
                   pair_layout=config.dpo.pair_layout, require_reference=reference_fingerprint is not None,
                   reference_fingerprint=reference_fingerprint,
                   reference_settings=tuple(reference_settings(config).items()) if reference_fingerprint else None,
                   on_bad_record=d.on_bad_record)

    @property
    def answers_per_row(self) -> int:
        return 2 if self.kind == "pairs" and self.pair_layout != "concat" else 1

    @property
    def max_prompt_len(self) -> int:
        """Longest prompt that still leaves one token per answer in the longest bucket."""
        return self.seq_buckets[-1] - self.answers_per_row


# The config fields besides the model that decide a reference log-likelihood's value: dtypes round it,
# the layout and buckets change the program, answer length and image count what is summed.
REFERENCE_SETTINGS = ("model.param_dtype", "model.dtype", "dpo.pair_layout", "data.seq_buckets",
                      "data.max_answer_len", "data.max_images", "data.max_pixels", "data.patch_buckets")


def reference_settings(config) -> dict[str, Any]:
    """{config field: value} for REFERENCE_SETTINGS: stamped into pairs by ref_logps (`ref_settings`),
    compared field by field by the trainer."""
    out = {}
    for field in REFERENCE_SETTINGS:
        group, name = field.split(".")
        value = config[group][name]
        out[field] = list(value) if isinstance(value, (tuple, list)) else value
    return out


class Prepare(grain.transforms.Map):
    """(source index, record bytes) → an example dict, or {"skip": reason} (module level: picklable)."""

    def __init__(self, source, options: Options, tokenizer: ChatTokenizer, image_input):
        self.source, self.options, self.tokenizer, self.image_input = source, options, tokenizer, image_input

    def map(self, item):
        if item == PAD_ROW:  # past the end of a finite pass (compared by value: workers unpickle it)
            return {"pad": True}
        index, data = item
        where = self.source.where(index)
        try:
            example = self._prepare(records.decode(data, self.options.kind, where), where)
        except records.RecordError as e:
            if self.options.on_bad_record == "error":
                raise
            return {"skip": e.reason}
        example["index"] = index
        return example

    def _prepare(self, record: dict, where: str) -> dict:
        o = self.options
        try:
            prepared = self.image_input.prepare(record["images"])
        except images.ImageError as e:
            field = "images" if getattr(e, "index", None) is None else f"images[{e.index}]"
            raise records.RecordError(where, field, str(e), reason="bad_image") from None
        except image_inputs.ImageBudgetError as e:
            raise records.RecordError(where, "images", str(e), reason=e.reason) from None
        messages = record["messages"]
        keys = ("chosen", "rejected") if o.kind == "pairs" else ("answer",)
        try:
            prompt = self.tokenizer.prompt(messages, prepared["tokens"] if prepared else [])
            if record.get("tokenizer") is not None and record["tokenizer"] == self.tokenizer.fingerprint:
                answers = {k: record[f"{k}_ids"] for k in keys}  # the ids the policy sampled, exactly
            else:  # text only, or ids of another tokenizer: cut from the whole conversation's tokens
                answers = {k: self.tokenizer.answer(messages, record[k]) for k in keys}
        except TemplateError as e:
            raise records.RecordError(where, "messages", str(e), reason="template") from None
        for k, ids in answers.items():
            if self.tokenizer.image_token_id in ids:
                raise records.RecordError(where, f"{k}_ids", "holds the image token", reason="template")
        if len(prompt) > o.max_prompt_len:
            raise records.RecordError(where, "messages", f"prompt of {len(prompt)} tokens (image tokens included) "
                                      f"exceeds {o.max_prompt_len}; prompts are never truncated",
                                      reason="prompt_too_long")
        example = {"prompt": np.asarray(prompt, np.int32), "images": prepared,
                   "positions": self.image_input.positions(prompt, prepared)}
        example.update({k: np.asarray(v, np.int32) for k, v in answers.items()})
        if o.kind == "pairs":
            example.update(self._rubric(record, where))
        return example

    def _rubric(self, record: dict, where: str) -> dict:
        o = self.options
        criteria = record["rubric"]["criteria"]
        if len(criteria) > o.max_criteria:
            raise records.RecordError(where, "rubric.criteria", f"{len(criteria)} criteria, more than "
                                      f"max_criteria={o.max_criteria}", reason="too_many_criteria")
        K = o.max_criteria
        out = {name: np.zeros(K, np.float32) for name in packing.RUBRIC_KEYS}
        n = len(criteria)
        out["chosen_scores"][:n] = records.normalized_scores(record["rubric"], record["chosen_scores"])
        out["rejected_scores"][:n] = records.normalized_scores(record["rubric"], record["rejected_scores"])
        essential = np.array([c["kind"] == "essential" for c in criteria], np.float32)
        kind_weight = np.where(essential > 0, o.essential_weight, o.additional_weight)
        out["criterion_weights"][:n] = np.array([c["weight"] for c in criteria], np.float32) * kind_weight
        out["criterion_mask"][:n] = 1.0
        out["essential_mask"][:n] = essential
        if o.require_reference:
            for field in ("ref_chosen_logp", "ref_rejected_logp"):
                if field not in record:
                    raise records.RecordError(where, field, "missing, but the run uses precomputed reference "
                                              "log-likelihoods", reason="missing_reference")
            problem = reference_mismatch(record, o)
            if problem:
                raise records.RecordError(where, problem[0], problem[1], reason="reference_mismatch")
            out["ref_chosen_logp"] = np.float32(record["ref_chosen_logp"])
            out["ref_rejected_logp"] = np.float32(record["ref_rejected_logp"])
        return out


def reference_mismatch(record: dict, options: Options) -> tuple[str, str] | None:
    """(record field, message) if a record's reference log-likelihoods were not computed by this run's
    reference model with this run's settings (a config field each), else None."""
    fingerprint = record.get("ref_fingerprint")
    if options.reference_fingerprint is not None and fingerprint != options.reference_fingerprint:
        return "ref_fingerprint", (f"{fingerprint!r}: these reference log-likelihoods come from another model than "
                                   f"this run's reference ({options.reference_fingerprint!r})")
    if options.reference_settings is None:
        return None
    stamped = record.get("ref_settings")
    if stamped is None:
        return "ref_settings", ("missing: these reference log-likelihoods carry no settings stamp (written by an "
                                "older rdpo_jax.data_prep.ref_logps); compute them again with the training config")
    for field, value in options.reference_settings:
        if stamped.get(field) != value:
            return "ref_settings", (f"config.{field}: the reference log-likelihoods were computed with "
                                    f"{stamped.get(field)!r}, this run uses {value!r}; run rdpo_jax.data_prep.ref_logps "
                                    "with this run's config")
    return None


class Collate:
    """Prepared examples → {"batch": arrays for the step, "stats": counts, "index": source index per row
    (−1 for padding)} (picklable)."""

    def __init__(self, options: Options, batch_size: int, pad_id: int, image_input):
        self.options, self.batch_size, self.pad_id, self.image_input = options, batch_size, pad_id, image_input

    def __call__(self, examples: Sequence[dict]) -> dict:
        o = self.options
        stats = {f"skipped/{r}": 0 for r in SKIP_REASONS}
        valid = np.zeros(self.batch_size, np.float32)
        index = np.full(self.batch_size, -1, np.int64)
        filler = self._filler()
        rows = []
        for i in range(self.batch_size):
            ex = examples[i] if i < len(examples) else {"pad": True}
            if "skip" in ex:
                stats[f"skipped/{ex['skip']}"] += 1
                ex = filler
            elif "pad" in ex:
                ex = filler
            else:
                valid[i], index[i] = 1.0, ex["index"]
            rows.append(ex)
        need = max(self._row_len(r) for r in rows)
        seq_len = next((b for b in o.seq_buckets if b >= need), o.seq_buckets[-1])  # else answers shrink to fit
        mrope = self.image_input.mrope
        if o.kind == "pairs":
            pairs = [packing.Pair(r["prompt"], r["chosen"], r["rejected"], r["positions"]) for r in rows]
            batch, trunc = packing.pack_pairs(pairs, layout=o.pair_layout, seq_len=seq_len,
                                              max_answer_len=o.max_answer_len, pad_id=self.pad_id, mrope=mrope)
            for name in packing.RUBRIC_KEYS:
                batch[name] = np.stack([r[name] for r in rows])
            if o.require_reference:
                for name in ("ref_chosen_logp", "ref_rejected_logp"):
                    batch[name] = np.array([r[name] for r in rows], np.float32)
        else:
            batch, trunc = packing.pack_sft([(r["prompt"], r["answer"], r["positions"]) for r in rows],
                                            seq_len=seq_len, max_answer_len=o.max_answer_len, pad_id=self.pad_id,
                                            mrope=mrope)
        image_arrays, image_stats = self.image_input.collate([r["images"] for r in rows])
        batch.update(image_arrays)
        batch["valid"] = valid
        stats.update(trunc)
        stats.update(image_stats)
        stats["examples"] = int(valid.sum())
        return {"batch": batch, "stats": {k: np.int64(v) for k, v in stats.items()}, "index": index}

    def _row_len(self, example: dict) -> int:
        """Tokens the example's row needs once its answers are cut to max_answer_len."""
        o = self.options
        answers = [min(len(example[k]), o.max_answer_len) for k in self._answer_keys(o)]
        return len(example["prompt"]) + (sum(answers) if o.answers_per_row == 2 else max(answers))

    @staticmethod
    def _answer_keys(o: Options) -> tuple[str, ...]:
        return ("chosen", "rejected") if o.kind == "pairs" else ("answer",)

    def _filler(self) -> dict:
        """A padding example: a one-token prompt without images, one-token answers, zero rubric."""
        o = self.options
        prompt = np.array([self.pad_id], np.int32)
        ex = {"prompt": prompt, "images": None, "positions": self.image_input.positions(prompt, None)}
        for k in self._answer_keys(o):
            ex[k] = np.array([self.pad_id], np.int32)
        if o.kind == "pairs":
            for name in packing.RUBRIC_KEYS:
                ex[name] = np.zeros(o.max_criteria, np.float32)
            ex["ref_chosen_logp"] = ex["ref_rejected_logp"] = np.float32(0)
        return ex


def _worker_init(worker_index: int, worker_count: int) -> None:
    del worker_index, worker_count
    import absl.flags

    absl.flags.FLAGS.mark_as_parsed()  # absl flags are not parsed in spawned worker processes


class _LocalRows(grain.MapDataset):
    """This process's rows of each global batch: position k ↦ global position (k // L)·B + p·L + k % L
    with L = B / n rows per process; positions past the end of a finite parent are `PAD_ROW`, so that
    every process sees whole global batches (not None: Grain drops None as a filtered element)."""

    def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int, process_count: int):
        super().__init__(parent)
        if global_batch % process_count:
            raise ValueError(f"a global batch of {global_batch} does not split over {process_count} processes")
        self._B, self._L, self._p = global_batch, global_batch // process_count, process_index
        n = len(parent)  # sys.maxsize when repeated forever: floor, so that the length stays an index
        self._batches = n // global_batch if n == sys.maxsize else -(-n // global_batch)

    def __len__(self) -> int:
        return self._batches * self._L

    def __getitem__(self, k):
        if isinstance(k, slice):
            return self.slice(k)
        step, row = divmod(int(k), self._L)
        g = step * self._B + self._p * self._L + row
        return self._parent[g] if g < len(self._parent) else PAD_ROW

    def __str__(self) -> str:
        return f"_LocalRows(global_batch={self._B}, process={self._p})"


def make_dataset(source, options: Options, tokenizer: ChatTokenizer, image_input, *,
                 global_batch_size: int, seed: int | None, num_epochs: int | None = None,
                 process_index: int | None = None, process_count: int | None = None) -> grain.MapDataset:
    """The indexed part of the pipeline: element s is this process's share of global batch s.

    The records of global batch s depend on (seed, s) only; process p of n gets its rows
    [p·B/n, (p+1)·B/n). `num_epochs=None` repeats forever (reshuffled each epoch); `seed=None` keeps
    the source order. `image_input`: the model family's adapter (`image_inputs.for_model`)."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    local_batch = global_batch_size // process_count
    collate = Collate(options, local_batch, tokenizer.pad_id, image_input)
    ds = grain.MapDataset.source(source)
    ds = (ds if seed is None else ds.shuffle(seed)).repeat(num_epochs)
    ds = _LocalRows(ds, global_batch_size, process_index, process_count)
    ds = ds.map(Prepare(source, options, tokenizer, image_input))
    return ds.batch(local_batch, batch_fn=collate)


def make_iterator(dataset: grain.MapDataset, *, workers: int = 0, buffer_size: int = 2):
    """An iterator with get_state()/set_state(); `workers` > 0 prepares batches in worker processes."""
    ds = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0 if workers else 2, prefetch_buffer_size=buffer_size))
    if workers:
        import absl.flags

        if not absl.flags.FLAGS.is_parsed():  # grain reads its absl flags (library use, e.g. tests/notebooks)
            absl.flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=buffer_size),
                            worker_init_fn=_worker_init)
    return iter(ds)


def agree_shapes(batch: dict[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
    """Pads this process's rows to the longest row length (bucket), its trained-token arrays to the widest
    (the width follows the bucket), and its patch buffers to the largest patch bucket, of any process in
    this step.

    Each process packs its rows into the smallest buckets they fit; one compiled program runs over the
    global array, so all processes must use the same shapes. Because a bucket is the smallest that fits
    the longest row, the largest bucket over processes is the one a single process holding the whole
    global batch picks, and padding a row further changes nothing in it: every process count gives the
    same batch. One small all-gather per step (multi-process runs only)."""
    shape = np.array([batch["input_ids"].shape[1], batch["targets"].shape[1],
                      batch["patches"].shape[1] if "patches" in batch else 0], np.int32)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        shape = np.max(multihost_utils.process_allgather(shape), axis=0)
    batch = packing.pad_rows(batch, int(shape[0]), pad_id, target_len=int(shape[1]))
    return image_inputs.pad_patches(batch, int(shape[2]))


def to_global(batch: dict[str, np.ndarray], shardings: dict) -> dict[str, jax.Array]:
    """This process's rows → global arrays sharded over the batch axes (every process calls this)."""
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in batch.items()}
