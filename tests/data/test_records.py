"""Record kinds: round trips through sharded ArrayRecord files, and one validation error per bad case."""

import copy
import json

import msgpack
import numpy as np
import pytest

from rdpo_jax import testing
from rdpo_jax.data import arrayrecord, records


def png(seed=0) -> bytes:
    return testing.png(np.random.default_rng(seed), (12, 10))


RUBRIC = {"criteria": [
    {"id": "count", "text": "Says there are two objects", "kind": "essential", "weight": 2.0, "scale": "binary"},
    {"id": "colour", "text": "Names the colours", "kind": "essential", "weight": 1.0, "scale": "binary"},
    {"id": "concise", "text": "Is concise", "kind": "additional", "weight": 0.5, "scale": "1-5"}]}
MESSAGES = [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image"}]}]


def examples(i=0) -> dict[str, dict]:
    return {
        "rubric_pool": dict(prompt_id=f"p{i}", images=[png(i)], messages=MESSAGES, rubric=RUBRIC,
                            reference_answer="two red circles"),
        "samples": dict(prompt_id=f"p{i}", sample_id=f"p{i}/s0", response="two circles", response_ids=[17, 4, 2],
                        policy_step=3, sampler={"temperature": 0.7, "top_p": 0.95, "model": "base",
                                                "tokenizer": "sha256:0123"}),
        "pairs": dict(pair_id=f"pair{i}", prompt_id=f"p{i}", images=[png(i)], messages=MESSAGES,
                      chosen="two red circles", rejected="three blue squares", rubric=RUBRIC,
                      chosen_scores=[1, 1, 4], rejected_scores=[0, 0, 5], meta={"miner": "rubric", "margin": 0.8},
                      chosen_ids=[17, 9, 4, 2], rejected_ids=[18, 7, 5], tokenizer="sha256:0123",
                      ref_chosen_logp=-12.5, ref_rejected_logp=-20.25, ref_fingerprint="abc123"),
        "groups": dict(group_id=f"p{i}/3", prompt_id=f"p{i}", images=[png(i)], messages=MESSAGES, rubric=RUBRIC,
                       answers=[dict(text="two red circles", scores=[1, 1, 4], sample_id=f"p{i}/s0", ids=[17, 9, 4, 2]),
                                dict(text="three blue squares", scores=[0, 0, 5], ids=[18, 7, 5]),
                                dict(text="two circles", scores=[1, 0, 3], ids=[17, 4, 2])],
                       pairs=[dict(pair_id=f"pair{i}a", chosen=0, rejected=1, meta={"margin": 0.8},
                                   ref_chosen_logp=-12.5, ref_rejected_logp=-20.25),
                              dict(pair_id=f"pair{i}b", chosen=0, rejected=2, meta={"margin": 0.3},
                                   ref_chosen_logp=-12.5, ref_rejected_logp=-9.0)],
                       tokenizer="sha256:0123", ref_fingerprint="abc123"),
        "sft": dict(images=[png(i)], messages=MESSAGES, answer="two red circles", example_id=f"e{i}"),
    }


@pytest.mark.parametrize("kind", records.KINDS)
def test_round_trip_every_kind(tmp_path, kind):
    items = [examples(i)[kind] for i in range(5)]
    manifest = arrayrecord.write(str(tmp_path), "data", kind, items, num_shards=2, creator="pytest")
    assert manifest["count"] == 5 and [s["count"] for s in manifest["shards"]] == [3, 2]
    on_disk = json.loads((tmp_path / "data.manifest.json").read_text())
    assert on_disk["kind"] == kind and on_disk["schema_version"] == records.SCHEMA_VERSION
    assert on_disk["creator"] == "pytest"
    assert sorted((p.name for p in tmp_path.glob("*.array_record"))) == [
        "data-00000-of-00002.array_record", "data-00001-of-00002.array_record"]
    back = list(arrayrecord.read(str(tmp_path / "data")))
    key = lambda r: json.dumps({k: v for k, v in r.items() if k != "images"}, sort_keys=True)  # noqa: E731
    assert sorted(map(key, back)) == sorted(map(key, items))
    if "images" in items[0]:
        assert sorted(r["images"][0] for r in back) == sorted(r["images"][0] for r in items)
    source = arrayrecord.Source(str(tmp_path / "data"))
    assert len(source) == 5 and source.where(4) == "data-00001-of-00002.array_record[1]"


def test_normalized_scores():
    assert records.normalized_scores(RUBRIC, [1, 0, 4]) == [1.0, 0.0, 0.75]


def test_partial_dataset_has_no_manifest(tmp_path):
    with pytest.raises(RuntimeError):
        with arrayrecord.Writer(str(tmp_path), "data", "sft") as w:
            w.write(examples()["sft"])
            raise RuntimeError("crash")
    with pytest.raises(FileNotFoundError, match="no manifest"):
        arrayrecord.Source(str(tmp_path / "data"))


def _bad(edit, kind="pairs"):
    record = copy.deepcopy(examples()[kind])
    edit(record)
    return record


BAD = [  # (case, kind, edit, field in the message, reason)
    ("missing field", "pairs", lambda r: r.pop("chosen"), "chosen", "schema"),
    ("mistyped field", "pairs", lambda r: r.update(chosen_scores="1,1,4"), "chosen_scores", "schema"),
    ("bool is not a number", "samples", lambda r: r.update(policy_step=True), "policy_step", "schema"),
    ("unknown field", "sft", lambda r: r.update(extra=1), "extra", "schema"),
    ("empty answer", "sft", lambda r: r.update(answer="  "), "answer", "empty_answer"),
    ("identical answers", "pairs", lambda r: r.update(rejected=r["chosen"]), "rejected", "identical_answers"),
    ("criteria/scores length mismatch", "pairs", lambda r: r.update(rejected_scores=[0, 1]), "rejected_scores",
     "scores_mismatch"),
    ("score off its scale", "pairs", lambda r: r.update(chosen_scores=[1, 1, 7]), "chosen_scores[2]",
     "scores_mismatch"),
    ("images vs image parts", "sft", lambda r: r["images"].append(png(1)), "messages", "image_count"),
    ("bad role", "sft", lambda r: r["messages"][0].update(role="robot"), "messages[0].role", "schema"),
    ("criterion kind", "rubric_pool", lambda r: r["rubric"]["criteria"][0].update(kind="must"),
     "rubric.criteria[0].kind", "schema"),
    ("duplicate criterion id", "rubric_pool", lambda r: r["rubric"]["criteria"][1].update(id="count"),
     "rubric.criteria[1].id", "schema"),
    ("non-positive weight", "rubric_pool", lambda r: r["rubric"]["criteria"][2].update(weight=0),
     "rubric.criteria[2].weight", "schema"),
    ("empty image bytes", "sft", lambda r: r.update(images=[b""]), "images[0]", "bad_image"),
    ("negative token id", "samples", lambda r: r.update(response_ids=[3, -1]), "response_ids[1]", "schema"),
    ("no token ids", "samples", lambda r: r.update(response_ids=[]), "response_ids", "schema"),
    ("token id not an int", "pairs", lambda r: r["chosen_ids"].append(2.0), "chosen_ids[4]", "schema"),
    ("ids of one answer only", "pairs", lambda r: r.pop("rejected_ids"), "rejected_ids", "schema"),
    ("ids without their tokenizer", "pairs", lambda r: r.pop("tokenizer"), "tokenizer", "schema"),
    ("group: no pairs", "groups", lambda r: r.update(pairs=[]), "pairs", "schema"),
    ("group: answer index out of range", "groups", lambda r: r["pairs"][1].update(rejected=3), "pairs[1].rejected",
     "schema"),
    ("group: negative answer index", "groups", lambda r: r["pairs"][0].update(chosen=-1), "pairs[0].chosen", "schema"),
    ("group: identical answers", "groups", lambda r: r["answers"][2].update(text="two red circles"),
     "pairs[1].rejected", "identical_answers"),
    ("group: answer in no pair", "groups", lambda r: r["answers"].append(dict(text="one", scores=[0, 0, 1],
                                                                            ids=[3])), "answers[3]", "schema"),
    ("group: scores off scale", "groups", lambda r: r["answers"][1].update(scores=[0, 2, 5]), "answers[1].scores[1]",
     "scores_mismatch"),
    ("group: ids of some answers", "groups", lambda r: r["answers"][1].pop("ids"), "answers[1].ids", "schema"),
    ("group: unknown answer field", "groups", lambda r: r["answers"][0].update(score=1), "answers[0].score", "schema"),
    ("group: reference of some pairs", "groups", lambda r: r["pairs"][1].pop("ref_rejected_logp"), "pairs[1]",
     "schema"),
    ("group: empty answer", "groups", lambda r: r["answers"][0].update(text=" "), "answers[0].text", "empty_answer"),
]


@pytest.mark.parametrize("case,kind,edit,field,reason", BAD, ids=[b[0] for b in BAD])
def test_validation_names_record_field_and_expectation(case, kind, edit, field, reason):
    data = msgpack.packb(_bad(edit, kind), use_bin_type=True)
    with pytest.raises(records.RecordError) as e:
        records.decode(data, kind, "train-00003-of-00008.array_record[17]")
    assert str(e.value).startswith(f"train-00003-of-00008.array_record[17]: field {field!r}: ")
    assert e.value.reason == reason and e.value.field == field


def test_corrupt_bytes():
    with pytest.raises(records.RecordError, match=r"x\[2\]: field '<bytes>': not a msgpack map") as e:
        records.decode(b"\xc1\xff\x00garbage", "pairs", "x[2]")
    assert e.value.reason == "corrupt"
    with pytest.raises(records.RecordError, match="expected a map, got list"):
        records.decode(msgpack.packb([1, 2]), "pairs", "x[3]")


def test_writer_rejects_invalid_records(tmp_path):
    with pytest.raises(records.RecordError, match=r"data record 1: field 'rejected': identical to chosen"):
        arrayrecord.write(str(tmp_path), "data", "pairs",
                          [examples()["pairs"], _bad(lambda r: r.update(rejected=r["chosen"]))])


def test_a_group_holds_the_pairs_records_of_its_pairs():
    group = examples()["groups"]
    pairs = records.pairs_of_group(group)
    assert [p["pair_id"] for p in pairs] == ["pair0a", "pair0b"]
    for p in pairs:
        records.validate(p, "pairs", "x")
    assert (pairs[1]["chosen"], pairs[1]["rejected"], pairs[1]["rejected_ids"]) == ("two red circles", "two circles",
                                                                                     [17, 4, 2])
    assert pairs[1]["ref_rejected_logp"] == -9.0 and pairs[0]["ref_fingerprint"] == "abc123"


def test_token_ids_are_optional():
    for kind, fields in (("samples", ["response_ids"]), ("pairs", ["chosen_ids", "rejected_ids", "tokenizer"])):
        record = {k: v for k, v in examples()[kind].items() if k not in fields}
        assert records.decode(records.encode(record, kind), kind, "x") == record


@pytest.mark.parametrize("version", [1, records.SCHEMA_VERSION])
def test_older_schema_versions_are_read(tmp_path, version):
    """Version 1 manifests (no token ids) are read: their records are valid version-2 records."""
    arrayrecord.write(str(tmp_path), "data", "sft", [examples()["sft"]])
    manifest = json.loads((tmp_path / "data.manifest.json").read_text())
    (tmp_path / "data.manifest.json").write_text(json.dumps(dict(manifest, schema_version=version)))
    assert len(list(arrayrecord.read(str(tmp_path / "data")))) == 1
    (tmp_path / "data.manifest.json").write_text(json.dumps(dict(manifest, schema_version=records.SCHEMA_VERSION + 1)))
    with pytest.raises(ValueError, match=f"schema_version {records.SCHEMA_VERSION + 1} is not one this code reads"):
        arrayrecord.Source(str(tmp_path / "data"))
