"""The Grain input pipeline: records → tokenized, preprocessed, packed batches → global jax.Arrays.

    source → shuffle(seed, reshuffled per epoch) → repeat → global batches of B records, of which
    this process takes rows [p·B/n, (p+1)·B/n) → Prepare (decode, validate, images, tokenize) →
    batch + Collate (pack into a length bucket, images into the family's arrays, pad) → worker
    processes → `agree_shapes` (every process pads to the longest buckets any process needs) →
    `to_global`

Images go through the model family's image adapter (`models/image_inputs.py`): it preprocesses each record's images,
says how many placeholder tokens each becomes (the tokenizer expands the template's image token to
that many) and, for M-RoPE families, the prompt's 3D positions; a batch's images become the arrays the
model reads (LLaVA: pixels [B, N, H, W, 3]; Qwen2.5-VL: a patch buffer per row from a patch bucket).
Records may hold 0 … `max_images` images.

DPO reads `pairs` records (one pair each) or `groups` records (a prompt's pairs together, up to
`max_pairs_per_group` pair slots per record: per-pair fields [B, P, …], see `batch.py`); a record is
the unit of batching, shuffling, sharding and resuming either way, and the loss averages over the pairs
present. With `data.groups_per_row` > 1 (SFT, multi_answer rows) a process's records of a batch share rows,
a row then being the unit of the step (sharding, micro-batches): see `Collate`. Packing is per process, so
the rows (not the pairs, their losses or the data order) differ with the number of processes.

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
import hashlib
import os
import sys
from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np

from rdpo_jax import packing
from rdpo_jax.batch import RUBRIC_KEYS, Batch
from rdpo_jax.data import images, records
from rdpo_jax.data.tokenize import TOKENIZER_FILES, ChatTokenizer, TemplateError

SKIP_REASONS = ("corrupt", "schema", "bad_image", "image_count", "image_budget", "empty_answer", "identical_answers",
                "scores_mismatch", "too_many_criteria", "group_too_large", "template", "prompt_too_long",
                "missing_reference", "reference_mismatch")
# what each record kind trains (Options.kind "pairs" reads pairs or groups records)
SOURCE_KINDS = {"pairs": ("pairs", "groups"), "sft": ("sft",)}
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
    max_pairs_per_group: int = 4  # groups records: P pair slots per record
    max_answers_per_group: int = 0  # groups records in multi_answer rows: answers per row (0 = 2P)
    groups_per_row: int = 1  # SFT, multi_answer: up to this many records share a row (`packing.plan_rows`)
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
        if self.max_pairs_per_group < 1 or self.max_answers_per_group < 0:
            raise ValueError(f"max_pairs_per_group {self.max_pairs_per_group} must be ≥ 1 and max_answers_per_group "
                             f"{self.max_answers_per_group} ≥ 0")
        if self.groups_per_row < 1 or (self.groups_per_row > 1 and self.kind == "pairs"
                                       and self.pair_layout != "multi_answer"):
            raise ValueError(f"groups_per_row {self.groups_per_row}: rows pack several records only in SFT and in "
                             "DPO's multi_answer layout (1 otherwise)")

    @classmethod
    def from_config(cls, config, *, reference_fingerprint: str | None = None) -> Options:
        """The options of a training config (`configs/*.py`). With `reference_fingerprint` (a run with
        `dpo.reference="precomputed"`), records must carry reference log-likelihoods of that model,
        stamped with this config's `reference_settings`."""
        d, dpo = config.data, config.objective == "dpo"
        return cls(kind="pairs" if dpo else "sft", seq_buckets=tuple(d.seq_buckets), max_answer_len=d.max_answer_len,
                   max_criteria=d.max_criteria, max_pairs_per_group=d.max_pairs_per_group,
                   max_answers_per_group=d.max_answers_per_group,
                   groups_per_row=d.groups_per_row,
                   essential_weight=d.essential_weight, additional_weight=d.additional_weight,
                   pair_layout=config.dpo.pair_layout, require_reference=reference_fingerprint is not None,
                   reference_fingerprint=reference_fingerprint,
                   reference_settings=tuple(reference_settings(config).items()) if reference_fingerprint else None,
                   on_bad_record=d.on_bad_record)

    def answers_per_row(self, answers: int = 2) -> int:
        """Answers in a row of a record with `answers` distinct answers (a pair has 2)."""
        if self.kind == "sft" or self.pair_layout == "concat":
            return 1
        return answers if self.pair_layout == "multi_answer" else 2

    def max_prompt_len(self, answers: int = 2) -> int:
        """Longest prompt that still leaves one token per answer of its rows in the longest bucket."""
        return self.seq_buckets[-1] - self.answers_per_row(answers)

    def slots(self, kind: str) -> tuple[int, int]:
        """(pair slots, answer slots) per record of a source kind: a pair is one of each pair's answers."""
        if kind != "groups":
            return 1, 2
        P = self.max_pairs_per_group
        return P, self.max_answers_per_group or 2 * P

    def target_width(self, seq_len: int, kind: str) -> int:
        """Trained tokens per row (the `targets` width) of a batch of rows of `seq_len` tokens: every answer a
        row holds at its longest, at most seq_len − 1."""
        answers = self.groups_per_row * self.answers_per_row(self.slots(kind)[1])
        return min(answers * self.max_answer_len, seq_len - 1)


# The config fields besides the reference's weights (`ref_fingerprint`) that change a reference
# log-likelihood's bits: the model folder's tokenizer, chat template, processor and architecture (stamped
# by content: a copy elsewhere is the same); dtypes round it; attention, LM-head chunking and layer scan
# are other programs for the same sum; the layout, buckets and records per row decide what each token
# sees; answer length and images what is summed. Left out, as they only pad or split the same rows: the
# batch size, pair and answer slots (data.max_pairs_per_group, max_answers_per_group) and the mesh (a
# one-host ref_logps serves a pod's run). Those, and the platform, may still move the last bits.
REFERENCE_SETTINGS = ("model.path", "model.param_dtype", "model.dtype", "model.attention", "model.vocab_chunk",
                      "model.scan_layers", "dpo.pair_layout", "data.seq_buckets", "data.groups_per_row",
                      "data.max_answer_len", "data.max_images", "data.max_pixels", "data.patch_buckets")
# What the trainer and ref_logps read from model.path besides the weights
MODEL_FILES = ("config.json", "preprocessor_config.json", "processor_config.json") + TOKENIZER_FILES


def reference_settings(config) -> dict[str, Any]:
    """{config field: value} for REFERENCE_SETTINGS (model.path: a content hash of its MODEL_FILES): stamped
    into pairs by ref_logps (`ref_settings`), compared field by field by the trainer."""
    out = {}
    for field in REFERENCE_SETTINGS:
        group, name = field.split(".")
        value = _files_hash(config.model.path, MODEL_FILES) if field == "model.path" else config[group][name]
        out[field] = list(value) if isinstance(value, (tuple, list)) else value
    return out


def _files_hash(folder: str, names: Sequence[str]) -> str:
    """A short content hash of the files `names` that `folder` holds ('files sha256:…': what the trainer's
    refusal names)."""
    digest = hashlib.sha256()
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                data = f.read()
            digest.update(f"{name}\0{len(data)}\0".encode())
            digest.update(data)
    return "files sha256:" + digest.hexdigest()[:16]


class Prepare(grain.transforms.Map):
    """(source index, record bytes) → an example dict, or {"skip": reason} (module level: picklable).

    A DPO example is a prompt group whatever its record kind (a pairs record is a group of one pair):
    prompt, images, positions, `answers` (token id arrays), `pairs` [(chosen, rejected) answer indices],
    and per pair its rubric arrays [n_pairs, K] and reference log-likelihoods [n_pairs]."""

    def __init__(self, source, options: Options, tokenizer: ChatTokenizer, image_input):
        self.source, self.options, self.tokenizer, self.image_input = source, options, tokenizer, image_input
        self.kind = source_kind(source, options)

    def map(self, item):
        if item == PAD_ROW:  # past the end of a finite pass (compared by value: workers unpickle it)
            return {"pad": True}
        index, data = item
        where = self.source.where(index)
        try:
            example = self._prepare(records.decode(data, self.kind, where), where)
        except records.RecordError as e:
            if self.options.on_bad_record == "error":
                raise
            return {"skip": e.reason}
        example["index"] = index
        return example

    def _prepare(self, record: dict, where: str) -> dict:
        o = self.options
        messages = record["messages"]
        fields, texts, ids, pairs = _answers(record, self.kind)
        max_pairs, max_answers = o.slots(self.kind)
        if len(pairs) > max_pairs or len(texts) > max_answers:
            raise records.RecordError(where, "pairs", f"{len(pairs)} pairs of {len(texts)} answers, more than "
                                      f"data.max_pairs_per_group={max_pairs} / max_answers_per_group={max_answers}",
                                      reason="group_too_large")
        try:
            prompt = self.tokenizer.encode(messages, record["images"], self.image_input)
            if ids is not None and record.get("tokenizer") == self.tokenizer.fingerprint:
                answers = ids  # the ids the policy sampled, exactly
            else:  # text only, or ids of another tokenizer: cut from the whole conversation's tokens
                answers = [self.tokenizer.answer(messages, t) for t in texts]
        except images.ImageError as e:
            field = "images" if getattr(e, "index", None) is None else f"images[{e.index}]"
            raise records.RecordError(where, field, str(e), reason="bad_image") from None
        except images.ImageBudgetError as e:
            raise records.RecordError(where, "images", str(e), reason=e.reason) from None
        except TemplateError as e:
            raise records.RecordError(where, "messages", str(e), reason="template") from None
        for field, a in zip(fields, answers):
            if self.tokenizer.image_token_id in a:
                raise records.RecordError(where, field, "holds the image token", reason="template")
        if len(prompt.ids) > o.max_prompt_len(len(answers)):
            raise records.RecordError(where, "messages", f"prompt of {len(prompt.ids)} tokens (image tokens "
                                      f"included) exceeds {o.max_prompt_len(len(answers))}; prompts are never "
                                      "truncated", reason="prompt_too_long")
        example = {"prompt": prompt.ids, "images": prompt.images, "positions": prompt.positions,
                   "answers": [np.asarray(a, np.int32) for a in answers]}
        if o.kind == "pairs":
            example["pairs"] = pairs
            example.update(self._rubric(record, where))
        return example

    def _rubric(self, record: dict, where: str) -> dict:
        """The record's rubric arrays float32[n_pairs, K] (`batch.RUBRIC_KEYS`) and, for a precomputed
        reference, ref_chosen_logp / ref_rejected_logp float32[n_pairs]."""
        o = self.options
        criteria = record["rubric"]["criteria"]
        if len(criteria) > o.max_criteria:
            raise records.RecordError(where, "rubric.criteria", f"{len(criteria)} criteria, more than "
                                      f"max_criteria={o.max_criteria}", reason="too_many_criteria")
        group = records.pairs_of_group(record) if "answers" in record else [record]
        K, n, N = o.max_criteria, len(criteria), len(group)
        out = {name: np.zeros((N, K), np.float32) for name in RUBRIC_KEYS}
        essential = np.array([c["kind"] == "essential" for c in criteria], np.float32)
        kind_weight = np.where(essential > 0, o.essential_weight, o.additional_weight)
        for j, pair in enumerate(group):
            out["chosen_scores"][j, :n] = records.normalized_scores(record["rubric"], pair["chosen_scores"])
            out["rejected_scores"][j, :n] = records.normalized_scores(record["rubric"], pair["rejected_scores"])
        out["criterion_weights"][:, :n] = np.array([c["weight"] for c in criteria], np.float32) * kind_weight
        out["criterion_mask"][:, :n] = 1.0
        out["essential_mask"][:, :n] = essential
        if o.require_reference:
            field = "pairs[0].ref_chosen_logp" if "answers" in record else "ref_chosen_logp"
            if "ref_chosen_logp" not in group[0]:
                raise records.RecordError(where, field, "missing, but the run uses precomputed reference "
                                          "log-likelihoods", reason="missing_reference")
            problem = reference_mismatch(record, o)
            if problem:
                raise records.RecordError(where, problem[0], problem[1], reason="reference_mismatch")
            for name in ("ref_chosen_logp", "ref_rejected_logp"):
                out[name] = np.array([p[name] for p in group], np.float32)
        return out


def source_kind(source, options: Options) -> str:
    """The record kind of a source (its manifest's; else the options'), checked against what they train."""
    kind = getattr(source, "kind", None) or options.kind
    if kind not in SOURCE_KINDS[options.kind]:
        raise ValueError(f"{source}: holds {kind!r} records; {options.kind} training reads {SOURCE_KINDS[options.kind]}")
    return kind


def _answers(record: dict, kind: str) -> tuple[list[str], list[str], list | None, list[tuple[int, int]]]:
    """(field names, answer texts, their token ids or None, pairs as answer indices) of a record."""
    if kind == "sft":
        return ["answer"], [record["answer"]], None, []
    if kind == "pairs":
        ids = None if record.get("chosen_ids") is None else [record["chosen_ids"], record["rejected_ids"]]
        return ["chosen_ids", "rejected_ids"], [record["chosen"], record["rejected"]], ids, [(0, 1)]
    answers = record["answers"]
    ids = None if answers[0].get("ids") is None else [a["ids"] for a in answers]
    return ([f"answers[{i}].ids" for i in range(len(answers))], [a["text"] for a in answers], ids,
            [(p["chosen"], p["rejected"]) for p in record["pairs"]])


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
                                "older data_prep.ref_logps); compute them again with the training config")
    for field, value in options.reference_settings:
        if field not in stamped:
            return "ref_settings", (f"config.{field}: not in the settings these reference log-likelihoods were "
                                    "stamped with (older data_prep.ref_logps); compute them again with "
                                    "this run's config")
        if stamped[field] != value:
            return "ref_settings", (f"config.{field}: the reference log-likelihoods were computed with "
                                    f"{stamped[field]!r}, this run uses {value!r}; run data_prep.ref_logps "
                                    "with this run's config")
    return None


class Collate:
    """Prepared examples → {"batch": a `batch.Batch`, "stats": counts, "index": source index per record
    (−1 for padding)} (picklable): every record a `packing.Group` (a skipped or missing one a padding
    group, valid 0), packed by `packing.pack` into the smallest bucket that holds them, with the family
    adapter's image arrays. A record is the batch's unit, with P pair slots (`max_pairs_per_group` for
    `groups` records, 1 for pairs records and SFT).

    With `groups_per_row` = k > 1 (SFT, multi_answer), the B records share R rows of T tokens (`_packed`):
    of R in ⌈B/k⌉, 2⌈B/k⌉, … B and T in the buckets, the fewest row slots R·T that hold them; a row is then
    the batch's unit (k·P pair slots, its images those of its records in order, `index` int64[R, k])."""

    def __init__(self, options: Options, batch_size: int, pad_id: int, image_input, kind: str | None = None):
        self.options, self.batch_size, self.pad_id, self.image_input = options, batch_size, pad_id, image_input
        self.kind = kind or options.kind

    def __call__(self, examples: Sequence[dict]) -> dict:
        o = self.options
        stats = {f"skipped/{r}": 0 for r in SKIP_REASONS}
        index = np.full(self.batch_size, -1, np.int64)
        groups, prepared = [], []  # the records as groups, and their images as the family adapter prepared them
        for i in range(self.batch_size):
            ex = examples[i] if i < len(examples) else {"pad": True}
            if "skip" in ex:
                stats[f"skipped/{ex['skip']}"] += 1
            if "skip" in ex or "pad" in ex:
                groups.append(self._filler())
                prepared.append(None)
                continue
            index[i] = ex["index"]
            groups.append(packing.Group(ex["prompt"], ex["answers"], ex.get("pairs", ()), ex["positions"],
                                        {k: ex[k] for k in self._fields()}))
            prepared.append(ex["images"])
        layout, (P, M) = ("sft", (1, 1)) if o.kind == "sft" else (o.pair_layout, o.slots(self.kind))
        if o.groups_per_row > 1:
            return self._packed(groups, prepared, index, stats, layout, P, M)
        need = max(self._row_len(g) for g in groups)
        seq_len = next((b for b in o.seq_buckets if b >= need), o.seq_buckets[-1])  # else answers shrink to fit
        arrays, image_stats = self.image_input.collate(prepared)
        batch, trunc = packing.pack(groups, layout=layout, seq_len=seq_len, max_answer_len=o.max_answer_len,
                                    max_pairs=P, max_answers=M, pad_id=self.pad_id, mrope=self.image_input.mrope,
                                    images=arrays)
        return self._element(batch, index, {**stats, **trunc, **image_stats})

    def _fields(self) -> tuple[str, ...]:
        """The per-pair fields records carry into the batch."""
        if self.options.kind == "sft":
            return ()
        return RUBRIC_KEYS + (("ref_chosen_logp", "ref_rejected_logp") if self.options.require_reference else ())

    @staticmethod
    def _element(batch: Batch, index: np.ndarray, stats: dict, examples: int | None = None) -> dict:
        """The collated element, with counts (`examples`: the records trained, default valid's sum)."""
        stats["examples"] = int(batch.valid.sum()) if examples is None else examples
        return {"batch": batch, "stats": {k: np.int64(v) for k, v in stats.items()}, "index": index}

    def _packed(self, groups: list, prepared: list, index: np.ndarray, stats: dict, layout: str, P: int,
                M: int) -> dict:
        """The batch of `groups_per_row` > 1: the valid records packed into rows (padding records dropped) by
        `packing.plan_rows`, in the row count and bucket of fewest row slots that hold them (ties: the
        shorter rows, whose attention costs less)."""
        o, k, B = self.options, self.options.groups_per_row, len(groups)
        real = [i for i in range(B) if index[i] >= 0]
        lengths = [min(self._row_len(groups[i]), o.seq_buckets[-1]) for i in real]  # a longer one rows alone
        patches = [len((prepared[i] or {}).get("patches", ())) for i in real]
        max_patches = getattr(self.image_input, "buckets", (0,))[-1]
        step = -(-B // k)
        best = None  # the fewest row slots (then the shorter rows) of ⌈B/k⌉, 2⌈B/k⌉, … rows × the buckets
        for rows in sorted({min(B, step * j) for j in range(1, k + 1)}):
            for seq_len in o.seq_buckets:
                if best is not None and (rows * seq_len, seq_len) >= (best[0] * best[1], best[1]):
                    continue
                plan = packing.plan_rows(lengths, seq_len=seq_len, rows=rows, groups_per_row=k, weights=patches,
                                         max_weight=max_patches)
                if plan is not None:
                    best = (rows, seq_len, plan)
        if best is None:  # cannot happen: one record per row always fits the longest bucket
            raise AssertionError(f"records of {lengths} tokens do not fit {B} rows of {o.seq_buckets[-1]}")
        rows, seq_len, plan = best
        plan = [[real[g] for g in members] for members in plan]
        arrays, image_stats = self.image_input.collate(
            [images.merge([prepared[i] for i in members]) for members in plan],
            slots=k * self.image_input.max_images)
        row_index = np.full((rows, k), -1, np.int64)
        for r, members in enumerate(plan):
            row_index[r, :len(members)] = index[members]
        batch, trunc = packing.pack(groups, layout=layout, seq_len=seq_len, max_answer_len=o.max_answer_len,
                                    max_pairs=P, max_answers=M, pad_id=self.pad_id, mrope=self.image_input.mrope,
                                    rows=plan, groups_per_row=k, images=arrays)
        # SFT counts its examples (a row's valid is whether it holds any), DPO its valid pairs
        return self._element(batch, row_index, {**stats, **trunc, **image_stats},
                             examples=len(real) if layout == "sft" else None)

    def _row_len(self, group: packing.Group) -> int:
        """Tokens the group's longest row needs once its answers are cut to max_answer_len."""
        o = self.options
        lengths = [min(len(a), o.max_answer_len) for a in group.answers]
        if o.kind == "sft" or o.pair_layout == "concat":
            return len(group.prompt) + max(lengths)
        if o.pair_layout == "multi_answer":
            return len(group.prompt) + sum(lengths)
        return len(group.prompt) + max(lengths[c] + lengths[r] for c, r in group.pairs)

    def _filler(self) -> packing.Group:
        """A padding example: a one-token prompt without images, one-token answers, zero per-pair fields."""
        prompt = np.array([self.pad_id], np.int32)
        positions = self.image_input.positions(prompt, None)
        if self.options.kind == "sft":
            return packing.Group(prompt, [prompt], (), positions, valid=False)
        fields = {k: np.zeros((1, *(self.options.max_criteria,) * (k in RUBRIC_KEYS)), np.float32)
                  for k in self._fields()}
        return packing.Group(prompt, [prompt, prompt], ((0, 1),), positions, fields, valid=False)


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
    the source order. `image_input`: the model family's adapter (`models.image_inputs.for_model`)."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    local_batch = global_batch_size // process_count
    collate = Collate(options, local_batch, tokenizer.pad_id, image_input, source_kind(source, options))
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


def agree_shapes(batch: Batch) -> Batch:
    """Pads this process's batch to the most units, the longest row length (bucket), the widest trained-token
    arrays (the width follows the bucket) and the largest patch bucket of any process in this step.

    Each process packs its rows into the smallest buckets they fit; one compiled program runs over the
    global array, so all processes must use the same shapes. Because a bucket is the smallest that fits
    the longest row, the largest bucket over processes is the one a single process holding the whole
    global batch picks, and padding a row further changes nothing in it: every process count gives the
    same batch. One small all-gather per step (multi-process runs only)."""
    sizes = np.array(batch.sizes(), np.int32)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        sizes = np.max(multihost_utils.process_allgather(sizes), axis=0)
    return batch.pad(*(int(n) for n in sizes))


def to_global(batch: Batch, shardings: Batch) -> Batch:
    """This process's units → global arrays sharded over the batch axes (every process calls this)."""
    return jax.tree.map(lambda s, x: jax.make_array_from_process_local_data(s, x), shardings, batch)
