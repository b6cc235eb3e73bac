"""Record kinds, their schemas and validation, and msgpack (de)serialization.

One msgpack map per record; never pickle (data files come from other people). Kinds:

  rubric_pool  prompt_id, images, messages, rubric, reference_answer?
  samples      prompt_id, sample_id, response, response_ids?, policy_step, sampler, (judged:) scores?,
               reasons?, judge?, unscorable?
  pairs        pair_id, prompt_id, images, messages, chosen, rejected, rubric, chosen_scores,
               rejected_scores, meta, chosen_ids?, rejected_ids?, tokenizer?, ref_chosen_logp?,
               ref_rejected_logp?, ref_fingerprint?, ref_settings?
  groups       group_id, prompt_id, images, messages, rubric, answers [{text, scores, sample_id?, ids?}],
               pairs [{pair_id, chosen, rejected, meta, ref_chosen_logp?, ref_rejected_logp?}], tokenizer?,
               ref_fingerprint?, ref_settings?
  sft          images, messages, answer, example_id?

Token ids (`response_ids`, `chosen_ids`, `rejected_ids`) are the ids the sampler generated (up to and
including the stop token when it stopped), so training can use them instead of re-tokenizing the text;
a pair has both or neither, together with `tokenizer`, the fingerprint of the tokenizer they belong to
(the sampler records it as `sampler["tokenizer"]`).

A `groups` record is a prompt's pairs together (`make_pairs --format=groups`): its distinct answers once
each, and pairs naming them by index (`chosen`, `rejected`), so the image and prompt are stored and
encoded once and an answer shared by several pairs once (the multi_answer layout); the answers carry
`ids` all or none, with `tokenizer` then. Every answer belongs to a pair; reference log-likelihoods are per
pair (their value depends on how the layout packs the pair), all pairs or none. `ref_fingerprint` names the model that computed the
reference log-likelihoods and `ref_settings` the training-config fields they depend on
(`pipeline.REFERENCE_SETTINGS`).

`images` is a list of encoded image files (bytes); `messages` a chat in the Hugging Face format,
[{role, content}] with content a string or a list of parts {"type": "text", "text": …} / {"type": "image"}
(one image part per entry of `images`, in order). A rubric is {criteria: [{id, text, kind, weight, scale}]}
with kind "essential" | "additional", weight > 0, scale "binary" (scores 0/1) | "1-5" (scores 1…5), and an
optional machine-checkable `check` (see CHECKS) for data with ground truth.
Every error names the record (source, index), the field and what was expected.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import msgpack

SCHEMA_VERSION = 4  # 2: optional token ids (samples, pairs); 3: groups; 4: ref_settings stamps every setting
# that changes the reference's bits (a trainer refuses an older stamp). An older record is a record of this one
READABLE_SCHEMA_VERSIONS = range(1, SCHEMA_VERSION + 1)
KINDS = ("rubric_pool", "samples", "pairs", "groups", "sft")
ROLES = ("system", "user", "assistant")
CRITERION_KINDS = ("essential", "additional")
SCALES = {"binary": (0.0, 1.0), "1-5": (1.0, 5.0)}


class RecordError(ValueError):
    """A record failed validation. `reason` is a short category used for skip counts."""

    def __init__(self, where: str, field: str, message: str, reason: str = "schema"):
        super().__init__(f"{where}: field {field!r}: {message}")
        self.where, self.field, self.reason = where, field, reason


# ----- field checks: each returns None or raises RecordError -----

def _type(where, field, value, types, name):
    if isinstance(value, bool) or not isinstance(value, types):  # no field is boolean; True is not 1 here
        raise RecordError(where, field, f"expected {name}, got {type(value).__name__}")


def _str(where, field, value):
    _type(where, field, value, str, "a string")


def _nonempty_str(where, field, value):
    _str(where, field, value)
    if not value.strip():
        answer = field in ("chosen", "rejected", "answer", "response") or (field.startswith("answers[")
                                                                          and field.endswith(".text"))
        raise RecordError(where, field, "expected a non-empty string", reason="empty_answer" if answer else "schema")


def _int(where, field, value):
    _type(where, field, value, int, "an integer")


def _number(where, field, value):
    _type(where, field, value, (int, float), "a number")
    if not math.isfinite(value):
        raise RecordError(where, field, f"expected a finite number, got {value}")


def _images(where, field, value):
    _type(where, field, value, list, "a list of encoded images (bytes)")
    for i, image in enumerate(value):
        _type(where, f"{field}[{i}]", image, bytes, "encoded image bytes")
        if not image:
            raise RecordError(where, f"{field}[{i}]", "empty image bytes", reason="bad_image")


def _token_ids(where, field, value):
    _type(where, field, value, list, "a list of token ids")
    if not value:
        raise RecordError(where, field, "expected at least one token id")
    for i, t in enumerate(value):
        _int(where, f"{field}[{i}]", t)
        if t < 0:
            raise RecordError(where, f"{field}[{i}]", f"expected a token id ≥ 0, got {t}")


def _map(where, field, value):
    _type(where, field, value, dict, "a map")
    for key in value:
        _str(where, f"{field} key", key)


def _messages(where, field, value):
    _type(where, field, value, list, "a list of chat messages")
    if not value:
        raise RecordError(where, field, "expected at least one message")
    for i, message in enumerate(value):
        f = f"{field}[{i}]"
        _type(where, f, message, dict, "a map with role and content")
        if message.get("role") not in ROLES:
            raise RecordError(where, f"{f}.role", f"expected one of {ROLES}, got {message.get('role')!r}")
        content = message.get("content")
        if isinstance(content, str):
            continue
        _type(where, f"{f}.content", content, list, "a string or a list of parts")
        for j, part in enumerate(content):
            p = f"{f}.content[{j}]"
            _type(where, p, part, dict, "a part map")
            if part.get("type") == "text":
                _str(where, f"{p}.text", part.get("text"))
            elif part.get("type") != "image":
                raise RecordError(where, f"{p}.type", f"expected 'text' or 'image', got {part.get('type')!r}")


def count_image_parts(messages: list[dict]) -> int:
    return sum(1 for m in messages if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image")


def _rubric(where, field, value):
    _type(where, field, value, dict, "a rubric map {criteria: [...]}")
    criteria = value.get("criteria")
    _type(where, f"{field}.criteria", criteria, list, "a list of criteria")
    if not criteria:
        raise RecordError(where, f"{field}.criteria", "expected at least one criterion")
    seen = set()
    for i, c in enumerate(criteria):
        f = f"{field}.criteria[{i}]"
        _type(where, f, c, dict, "a criterion map")
        _str(where, f"{f}.id", c.get("id"))
        if c["id"] in seen:
            raise RecordError(where, f"{f}.id", f"duplicate criterion id {c['id']!r}")
        seen.add(c["id"])
        _nonempty_str(where, f"{f}.text", c.get("text"))
        if c.get("kind") not in CRITERION_KINDS:
            raise RecordError(where, f"{f}.kind", f"expected one of {CRITERION_KINDS}, got {c.get('kind')!r}")
        _number(where, f"{f}.weight", c.get("weight"))
        if c["weight"] <= 0:
            raise RecordError(where, f"{f}.weight", f"expected a weight > 0, got {c['weight']}")
        if c.get("scale") not in SCALES:
            raise RecordError(where, f"{f}.scale", f"expected one of {tuple(SCALES)}, got {c.get('scale')!r}")
        if "check" in c:
            _check_spec(where, f"{f}.check", c["check"], c["scale"])
        unknown = sorted(set(c) - {"id", "text", "kind", "weight", "scale", "check"})
        if unknown:
            raise RecordError(where, f"{f}.{unknown[0]}", "not a criterion field (id, text, kind, weight, scale, check)")


# Machine-checkable criteria (the rule-based generator writes them, the verifier judge reads them).
CHECKS = {"contains": {"phrase": str}, "not_contains": {"phrase": str}, "count": {"noun": str, "value": int},
          "answer": {"value": str, "options": list}, "max_words": {"value": int}}
OPTIONAL_CHECK_FIELDS = {"answer": {"after": str}}  # the final answer is read after this marker's last occurrence


def _check_spec(where, field, spec, scale):
    _type(where, field, spec, dict, "a check map {type, …}")
    kind = spec.get("type")
    if kind not in CHECKS:
        raise RecordError(where, f"{field}.type", f"expected one of {sorted(CHECKS)}, got {kind!r}")
    for name, typ in CHECKS[kind].items():
        if name not in spec:
            raise RecordError(where, f"{field}.{name}", f"missing (required by a {kind!r} check)")
        _type(where, f"{field}.{name}", spec[name], typ, typ.__name__)
    for name, typ in OPTIONAL_CHECK_FIELDS.get(kind, {}).items():
        if name in spec:
            _type(where, f"{field}.{name}", spec[name], typ, typ.__name__)
    if scale != "binary":
        raise RecordError(where, field, "checks give pass/fail verdicts: the criterion's scale must be 'binary'")


def _str_list(where, field, value):
    _type(where, field, value, list, "a list of strings")
    for i, x in enumerate(value):
        _str(where, f"{field}[{i}]", x)


def check_rubric(rubric: Any, where: str) -> dict:
    """Validates a rubric on its own (rubric generators use it before writing pool records)."""
    _rubric(where, "rubric", rubric)
    return rubric


def _scores(where, field, value):
    _type(where, field, value, list, "a list of scores")
    for i, s in enumerate(value):
        _number(where, f"{field}[{i}]", s)


def _list(where, field, value):
    _type(where, field, value, list, "a list")
    if not value:
        raise RecordError(where, field, "expected at least one entry")


# field -> (check, required)
Schema = dict[str, tuple[Callable, bool]]
SCHEMAS: dict[str, Schema] = {
    "rubric_pool": {"prompt_id": (_str, True), "images": (_images, True), "messages": (_messages, True),
                    "rubric": (_rubric, True), "reference_answer": (_str, False)},
    # samples, once judged, carry the verdict: raw scores and reasons per criterion (rubric order) or
    # the reason they could not be scored
    "samples": {"prompt_id": (_str, True), "sample_id": (_str, True), "response": (_str, True),
                "response_ids": (_token_ids, False), "policy_step": (_int, True), "sampler": (_map, True),
                "scores": (_scores, False), "reasons": (_str_list, False), "judge": (_str, False),
                "unscorable": (_str, False)},
    "pairs": {"pair_id": (_str, True), "prompt_id": (_str, True), "images": (_images, True),
              "messages": (_messages, True), "chosen": (_nonempty_str, True), "rejected": (_nonempty_str, True),
              "rubric": (_rubric, True), "chosen_scores": (_scores, True), "rejected_scores": (_scores, True),
              "meta": (_map, True), "chosen_ids": (_token_ids, False), "rejected_ids": (_token_ids, False),
              "tokenizer": (_str, False), "ref_chosen_logp": (_number, False), "ref_rejected_logp": (_number, False),
              "ref_fingerprint": (_str, False), "ref_settings": (_map, False)},
    "groups": {"group_id": (_str, True), "prompt_id": (_str, True), "images": (_images, True),
               "messages": (_messages, True), "rubric": (_rubric, True), "answers": (_list, True),
               "pairs": (_list, True), "tokenizer": (_str, False), "ref_fingerprint": (_str, False),
               "ref_settings": (_map, False)},
    "sft": {"images": (_images, True), "messages": (_messages, True), "answer": (_nonempty_str, True),
            "example_id": (_str, False)},
}


def validate(record: Any, kind: str, where: str) -> dict:
    """Checks a decoded record of `kind` against its schema; returns it, or raises RecordError."""
    if kind not in SCHEMAS:
        raise ValueError(f"unknown record kind {kind!r}; kinds: {KINDS}")
    if not isinstance(record, dict):
        raise RecordError(where, "<record>", f"expected a map, got {type(record).__name__}")
    schema = SCHEMAS[kind]
    for field, (check, required) in schema.items():
        if field not in record or record[field] is None:
            if required:
                raise RecordError(where, field, "missing (required)")
            continue
        check(where, field, record[field])
    unknown = sorted(set(record) - set(schema))
    if unknown:
        raise RecordError(where, unknown[0], f"not a field of a {kind} record (fields: {sorted(schema)})")
    if "images" in record and count_image_parts(record["messages"]) != len(record["images"]):
        raise RecordError(where, "messages", f"{count_image_parts(record['messages'])} image parts for "
                          f"{len(record['images'])} images", reason="image_count")
    if kind == "pairs":
        _validate_pair(record, where)
    if kind == "groups":
        _validate_group(record, where)
    return record


def _fields(where, field, value, schema: Schema):
    """A map nested in a record (a group's answer or pair) against its schema."""
    _type(where, field, value, dict, f"a map with {sorted(schema)}")
    for name, (check, required) in schema.items():
        if value.get(name) is None:
            if required:
                raise RecordError(where, f"{field}.{name}", "missing (required)")
            continue
        check(where, f"{field}.{name}", value[name])
    unknown = sorted(set(value) - set(schema))
    if unknown:
        raise RecordError(where, f"{field}.{unknown[0]}", f"not a field here (fields: {sorted(schema)})")


def _check_scores(where, field, scores, criteria):
    if len(scores) != len(criteria):
        raise RecordError(where, field, f"{len(scores)} scores for {len(criteria)} criteria", reason="scores_mismatch")
    for i, (s, c) in enumerate(zip(scores, criteria)):
        lo, hi = SCALES[c["scale"]]
        if not lo <= s <= hi or (c["scale"] == "binary" and s not in (0, 1)):
            raise RecordError(where, f"{field}[{i}]", f"score {s} is outside the {c['scale']!r} scale of "
                              f"criterion {c['id']!r}", reason="scores_mismatch")


def _validate_pair(record: dict, where: str):
    if record["chosen"] == record["rejected"]:
        raise RecordError(where, "rejected", "identical to chosen", reason="identical_answers")
    has = {f: record.get(f) is not None for f in ("chosen_ids", "rejected_ids", "tokenizer")}
    if len(set(has.values())) > 1:  # ids of one answer only, or ids without the tokenizer they belong to
        missing = next(f for f, present in has.items() if not present)
        raise RecordError(where, missing, "missing: chosen_ids, rejected_ids and tokenizer come together")
    criteria = record["rubric"]["criteria"]
    for field in ("chosen_scores", "rejected_scores"):
        _check_scores(where, field, record[field], criteria)


def _index(where, field, value):
    _int(where, field, value)
    if value < 0:
        raise RecordError(where, field, f"expected an answer index ≥ 0, got {value}")


GROUP_ANSWER: Schema = {"text": (_nonempty_str, True), "scores": (_scores, True), "sample_id": (_str, False),
                        "ids": (_token_ids, False)}
GROUP_PAIR: Schema = {"pair_id": (_str, True), "chosen": (_index, True), "rejected": (_index, True),
                      "meta": (_map, True), "ref_chosen_logp": (_number, False), "ref_rejected_logp": (_number, False)}


def _validate_group(record: dict, where: str):
    answers, pairs, criteria = record["answers"], record["pairs"], record["rubric"]["criteria"]
    for i, a in enumerate(answers):
        _fields(where, f"answers[{i}]", a, GROUP_ANSWER)
        _check_scores(where, f"answers[{i}].scores", a["scores"], criteria)
    with_ids = [a.get("ids") is not None for a in answers]
    if any(with_ids) and not (all(with_ids) and record.get("tokenizer") is not None):
        field = "tokenizer" if all(with_ids) else f"answers[{with_ids.index(False)}].ids"
        raise RecordError(where, field, "missing: every answer's ids and the tokenizer come together")
    used = set()
    for j, p in enumerate(pairs):
        _fields(where, f"pairs[{j}]", p, GROUP_PAIR)
        for side in ("chosen", "rejected"):
            if p[side] >= len(answers):
                raise RecordError(where, f"pairs[{j}].{side}", f"answer {p[side]} of {len(answers)}")
        if answers[p["chosen"]]["text"] == answers[p["rejected"]]["text"]:
            raise RecordError(where, f"pairs[{j}].rejected", "identical to chosen", reason="identical_answers")
        used.update((p["chosen"], p["rejected"]))
    unused = sorted(set(range(len(answers))) - used)
    if unused:
        raise RecordError(where, f"answers[{unused[0]}]", "in no pair (a group holds its pairs' answers only)")
    with_ref = [p.get("ref_chosen_logp") is not None and p.get("ref_rejected_logp") is not None for p in pairs]
    if any(with_ref) and not all(with_ref):
        raise RecordError(where, f"pairs[{with_ref.index(False)}]", "missing ref_chosen_logp / ref_rejected_logp: "
                          "reference log-likelihoods come for every pair of a group or for none")


def pairs_of_group(group: dict) -> list[dict]:
    """A groups record as the pairs records it holds (tools that read one pair at a time)."""
    answers, out = group["answers"], []
    for p in group["pairs"]:
        c, r = answers[p["chosen"]], answers[p["rejected"]]
        pair = {k: group[k] for k in ("prompt_id", "images", "messages", "rubric")}
        pair.update(pair_id=p["pair_id"], chosen=c["text"], rejected=r["text"], chosen_scores=c["scores"],
                    rejected_scores=r["scores"], meta=p["meta"])
        if c.get("ids") is not None:
            pair.update(chosen_ids=c["ids"], rejected_ids=r["ids"], tokenizer=group["tokenizer"])
        for k in ("ref_chosen_logp", "ref_rejected_logp"):
            if p.get(k) is not None:
                pair[k] = p[k]
        for k in ("ref_fingerprint", "ref_settings"):
            if group.get(k) is not None:
                pair[k] = group[k]
        out.append(pair)
    return out


def normalized_scores(rubric: dict, scores: list[float]) -> list[float]:
    """Scores mapped to [0, 1]: binary stays 0/1, a 1–5 score s becomes (s − 1)/4."""
    out = []
    for s, c in zip(scores, rubric["criteria"]):
        lo, hi = SCALES[c["scale"]]
        out.append((float(s) - lo) / (hi - lo))
    return out


def encode(record: dict, kind: str, where: str = "<new record>") -> bytes:
    """Validates and serializes one record (msgpack map, binary fields as bin)."""
    return msgpack.packb(validate(record, kind, where), use_bin_type=True)


def decode(data: bytes, kind: str, where: str) -> dict:
    """Deserializes and validates one record; corrupt bytes raise RecordError (reason "corrupt")."""
    try:
        record = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated exception types for bad input
        raise RecordError(where, "<bytes>", f"not a msgpack map ({type(e).__name__}: {e})", reason="corrupt") from e
    return validate(record, kind, where)
