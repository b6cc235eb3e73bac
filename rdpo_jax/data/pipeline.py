"""The Grain input pipeline: records → tokenized, preprocessed, packed batches → global jax.Arrays.

    source[process::processes] → shuffle(seed, reshuffled per epoch) → repeat → Prepare (decode,
    validate, images, tokenize) → batch + Collate (pack into a length bucket, pad) → worker processes
    → `to_global` (jax.make_array_from_process_local_data on the batch sharding)

Everything before the worker processes is a `grain.MapDataset`, i.e. indexed: the order is a pure
function of (seed, step), independent of the number of workers, and the iterator state (saved in the
trainer's checkpoint) restores the exact position.

Bad records (`on_bad_record="skip"`) keep their slot as a padding example (`valid` = 0) and are counted
by reason in the batch's `stats`, so counts survive worker processes and never shift later batches;
`"error"` raises a RecordError naming the file, the index in it and the field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import grain
import jax
import numpy as np

from rdpo_jax import packing
from rdpo_jax.data import images, records
from rdpo_jax.data.tokenize import ChatTokenizer, TemplateError

SKIP_REASONS = ("corrupt", "schema", "bad_image", "image_count", "empty_answer", "identical_answers",
                "scores_mismatch", "too_many_criteria", "template", "prompt_too_long", "missing_reference",
                "reference_mismatch")
ON_BAD_RECORD = ("error", "skip")


@dataclasses.dataclass(frozen=True)
class Options:
    """What turns records into batches (the trainer fills it from `config.data`)."""
    kind: str  # "pairs" | "sft"
    seq_buckets: tuple[int, ...]  # padded row lengths; a batch uses the smallest that fits
    max_answer_len: int  # each answer is cut to this many tokens (counted)
    images_per_example: int = 1
    max_criteria: int = 16  # rubric arrays are padded to this K
    essential_weight: float = 1.0
    additional_weight: float = 1.0
    pair_layout: str = "shared_prefix"
    require_reference: bool = False  # records must carry ref_chosen_logp / ref_rejected_logp …
    reference_fingerprint: str | None = None  # … computed by this reference (else a RecordError)
    on_bad_record: str = "error"

    def __post_init__(self):
        if self.kind not in ("pairs", "sft"):
            raise ValueError(f"data kind {self.kind!r}: training reads 'pairs' or 'sft' records")
        if self.on_bad_record not in ON_BAD_RECORD:
            raise ValueError(f"on_bad_record {self.on_bad_record!r} is not one of {ON_BAD_RECORD}")
        if not self.seq_buckets or list(self.seq_buckets) != sorted(set(self.seq_buckets)):
            raise ValueError(f"seq_buckets must be increasing, got {self.seq_buckets}")
        packing.rows_per_pair(self.pair_layout)

    @property
    def answers_per_row(self) -> int:
        return 2 if self.kind == "pairs" and self.pair_layout == "shared_prefix" else 1

    @property
    def max_prompt_len(self) -> int:
        """Longest prompt that still leaves one token per answer in the longest bucket."""
        return self.seq_buckets[-1] - self.answers_per_row


class Prepare(grain.transforms.Map):
    """(source index, record bytes) → an example dict, or {"skip": reason} (module level: picklable)."""

    def __init__(self, source, options: Options, tokenizer: ChatTokenizer, image_config: images.ImageConfig | None):
        self.source, self.options, self.tokenizer, self.image_config = source, options, tokenizer, image_config

    def map(self, item):
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
        if len(record["images"]) != o.images_per_example:
            raise records.RecordError(where, "images", f"{len(record['images'])} images, the model is configured "
                                      f"for {o.images_per_example} per example", reason="image_count")
        pixels = []
        for i, data in enumerate(record["images"]):
            try:
                pixels.append(images.load_and_preprocess(data, self.image_config))
            except images.ImageError as e:
                raise records.RecordError(where, f"images[{i}]", str(e), reason="bad_image") from None
        messages = record["messages"]
        try:
            prompt = self.tokenizer.prompt(messages, len(pixels))
            answers = {k: self.tokenizer.answer(messages, record[k])
                       for k in (("chosen", "rejected") if o.kind == "pairs" else ("answer",))}
        except TemplateError as e:
            raise records.RecordError(where, "messages", str(e), reason="template") from None
        if len(prompt) > o.max_prompt_len:
            raise records.RecordError(where, "messages", f"prompt of {len(prompt)} tokens (image tokens included) "
                                      f"exceeds {o.max_prompt_len}; prompts are never truncated",
                                      reason="prompt_too_long")
        example = {"prompt": np.asarray(prompt, np.int32), "pixels": np.stack(pixels) if pixels else None}
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
        out = {name: np.zeros(K, np.float32) for name in
               ("chosen_scores", "rejected_scores", "criterion_weights", "criterion_mask", "essential_mask")}
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
            fingerprint = record.get("ref_fingerprint")
            if o.reference_fingerprint is not None and fingerprint != o.reference_fingerprint:
                raise records.RecordError(where, "ref_fingerprint", f"{fingerprint!r}: these reference "
                                          "log-likelihoods come from another model than this run's reference "
                                          f"({o.reference_fingerprint!r})", reason="reference_mismatch")
            out["ref_chosen_logp"] = np.float32(record["ref_chosen_logp"])
            out["ref_rejected_logp"] = np.float32(record["ref_rejected_logp"])
        return out


class Collate:
    """Prepared examples → {"batch": arrays for the step, "stats": counts, "index": source index per row
    (−1 for padding)} (picklable)."""

    def __init__(self, options: Options, batch_size: int, pad_id: int, image_token_id: int, image_seq_len: int,
                 image_shape: tuple[int, int, int] | None):
        self.options, self.batch_size, self.pad_id = options, batch_size, pad_id
        self.image_token_id, self.image_seq_len, self.image_shape = image_token_id, image_seq_len, image_shape

    def __call__(self, examples: Sequence[dict]) -> dict:
        o = self.options
        stats = {f"skipped/{r}": 0 for r in SKIP_REASONS}
        valid = np.zeros(self.batch_size, np.float32)
        index = np.full(self.batch_size, -1, np.int64)
        filler = self._filler()
        rows = []
        for i in range(self.batch_size):
            ex = examples[i] if i < len(examples) else filler  # the last batch of a finite epoch is padded
            if "skip" in ex:
                stats[f"skipped/{ex['skip']}"] += 1
                ex = filler
            elif i < len(examples):
                valid[i], index[i] = 1.0, ex["index"]
            rows.append(ex)
        need = max(self._row_len(r) for r in rows)
        seq_len = next((b for b in o.seq_buckets if b >= need), o.seq_buckets[-1])  # else answers shrink to fit
        if o.kind == "pairs":
            pairs = [packing.Pair(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
            batch, trunc = packing.pack_pairs(pairs, layout=o.pair_layout, seq_len=seq_len,
                                              max_answer_len=o.max_answer_len, pad_id=self.pad_id)
            for name in ("chosen_scores", "rejected_scores", "criterion_weights", "criterion_mask", "essential_mask"):
                batch[name] = np.stack([r[name] for r in rows])
            if o.require_reference:
                for name in ("ref_chosen_logp", "ref_rejected_logp"):
                    batch[name] = np.array([r[name] for r in rows], np.float32)
        else:
            batch, trunc = packing.pack_sft([(r["prompt"], r["answer"]) for r in rows], seq_len=seq_len,
                                            max_answer_len=o.max_answer_len, pad_id=self.pad_id)
        if o.images_per_example:
            batch["pixel_values"] = np.stack([r["pixels"] for r in rows])
        batch["valid"] = valid
        stats.update(trunc)
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
        """A padding example: placeholders for its (blank) images, one-token answers, zero rubric."""
        o = self.options
        n = o.images_per_example
        ex = {"prompt": np.array([self.image_token_id] * (n * self.image_seq_len) + [self.pad_id], np.int32),
              "pixels": np.zeros((n, *self.image_shape), np.float32) if n else None}
        for k in self._answer_keys(o):
            ex[k] = np.array([self.pad_id], np.int32)
        if o.kind == "pairs":
            for name in ("chosen_scores", "rejected_scores", "criterion_weights", "criterion_mask", "essential_mask"):
                ex[name] = np.zeros(o.max_criteria, np.float32)
            ex["ref_chosen_logp"] = ex["ref_rejected_logp"] = np.float32(0)
        return ex


def _worker_init(worker_index: int, worker_count: int) -> None:
    del worker_index, worker_count
    import absl.flags

    absl.flags.FLAGS.mark_as_parsed()  # absl flags are not parsed in spawned worker processes


def make_dataset(source, options: Options, tokenizer: ChatTokenizer, image_config: images.ImageConfig | None, *,
                 local_batch_size: int, seed: int, num_epochs: int | None = None,
                 process_index: int | None = None, process_count: int | None = None) -> grain.MapDataset:
    """The indexed part of the pipeline: this process's disjoint share of the records, batched."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    image_shape = None
    if options.images_per_example:
        h, w = image_config.output_size
        image_shape = (h, w, 3)
    collate = Collate(options, local_batch_size, tokenizer.pad_id, tokenizer.image_token_id,
                      tokenizer.image_seq_len, image_shape)
    ds = grain.MapDataset.source(source)[process_index::process_count]
    ds = ds.shuffle(seed).repeat(num_epochs)
    ds = ds.map(Prepare(source, options, tokenizer, image_config))
    return ds.batch(local_batch_size, batch_fn=collate)


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


def to_global(batch: dict[str, np.ndarray], shardings: dict) -> dict[str, jax.Array]:
    """This process's rows → global arrays sharded over the batch axes (every process calls this)."""
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in batch.items()}
