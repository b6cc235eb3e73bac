"""common.Output: chunks hold whole items, so an output abandoned at any record (a crash) never leaves an
item marked done with records missing; items without records (mark_done) are done too."""

import json

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader

from data_prep import common
from rdpo_jax.data import arrayrecord, records

N = 6  # records per item (a prompt's samples)


def _sample(prompt: int, j: int) -> dict:
    return dict(prompt_id=f"p{prompt}", sample_id=f"p{prompt}/0/{j}", response=f"answer {j}", policy_step=0,
                sampler={})


def _committed(folder) -> dict[str, list[dict]]:
    """Records per key in the committed chunks (a chunk's keys.json is its commit)."""
    out = {}
    for keys in sorted(folder.glob("out-s*-c*.keys.json")):
        reader = ArrayRecordReader(str(keys).replace(".keys.json", ".array_record"))
        chunk = [records.decode(reader.read([i])[0], "samples", "chunk") for i in range(reader.num_records())]
        reader.close()
        for key in json.loads(keys.read_text()):
            out[key] = [r for r in chunk if r["prompt_id"] == key]
    return out


@pytest.mark.parametrize("stop_at", [13, 20, 24, 27, 35])  # inside items (not multiples of N) and between
def test_a_crash_never_commits_part_of_an_item(tmp_path, stop_at):
    out = common.Output(str(tmp_path), "out", "samples", 0, 1, chunk_size=8)
    added = 0
    for prompt in range(6):
        for j in range(N):
            if added == stop_at:
                break
            out.add(f"p{prompt}", _sample(prompt, j))
            added += 1
    del out  # abandoned without close: whatever it buffered is lost, as in a kill
    committed = _committed(tmp_path)
    assert committed, "something was committed"
    assert all(len(v) == N for v in committed.values()), {k: len(v) for k, v in committed.items()}
    assert set(common.Output(str(tmp_path), "out", "samples", 0, 1, chunk_size=8).done) == set(committed)


def test_chunks_of_whole_items_and_mark_done(tmp_path):
    out = common.Output(str(tmp_path), "out", "samples", 0, 1, chunk_size=8)
    for prompt in range(4):
        if prompt == 2:
            out.mark_done("p2")  # e.g. a prompt without a pair
            continue
        for j in range(N):
            out.add(f"p{prompt}", _sample(prompt, j))
    manifest = out.close()
    chunks = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("out-s*-c*.keys.json"))]
    # at least 8 records a chunk, ended at the next item: p0+p1 (12 records), then p2 (none) + p3 at close
    assert chunks == [["p0", "p1"], ["p2", "p3"]]
    assert manifest["count"] == 18
    assert [r["sample_id"] for r in arrayrecord.read(str(tmp_path / "out"))] == [
        f"p{p}/0/{j}" for p in (0, 1, 3) for j in range(N)]
    assert common.Output(str(tmp_path), "out", "samples", 0, 1).done == {"p0", "p1", "p2", "p3"}


def test_a_rerun_writing_another_kind_is_refused(tmp_path):
    """make_pairs --format=groups into the out of a --format=pairs run: an error, not a mixed dataset —
    whether the first run finished (manifest) or was killed (chunks only)."""
    from data_prep import smoke

    rng = np.random.default_rng(0)
    for finished in (True, False):
        folder = tmp_path / f"finished_{finished}"
        out = common.Output(str(folder), "pairs", "pairs", 0, 1, chunk_size=1)
        out.add("p0", smoke.pair(rng, 0))
        out.add("p1", smoke.pair(rng, 1))
        out.close() if finished else out.flush()
        with pytest.raises(ValueError, match="an earlier run wrote 'pairs' records there; this one writes 'groups'"):
            common.Output(str(folder), "pairs", "groups", 0, 1)
        assert "p0" in common.Output(str(folder), "pairs", "pairs", 0, 1).done  # the same kind resumes


def test_a_command_with_a_training_config_refuses_the_distributed_flags():
    """ref_logps joins JAX processes as its training config says: a --distributed_* flag there would be ignored,
    so it is refused, naming the config's fields."""
    from absl import app, flags

    from rdpo_jax import defaults

    holder = flags.FLAGS["distributed_auto"]
    holder.present = 1
    try:
        with pytest.raises(app.UsageError, match="--config.distributed.coordinator"):
            common.shard(defaults.train().distributed)
    finally:
        holder.present = 0


def test_an_item_written_by_two_shards_is_refused_before_the_dataset_manifest(tmp_path):
    """Shards that disagree on which items are whose (say, a shard resumed by a release that assigns items
    otherwise) would put an item in the dataset twice: the last shard to close refuses, naming it."""
    first = common.Output(str(tmp_path), "out", "samples", 0, 2)
    first.add("p0", _sample(0, 0))
    first.add("p1", _sample(1, 0))
    assert first.close() is None  # shard 1 has not finished
    second = common.Output(str(tmp_path), "out", "samples", 1, 2)
    second.add("p1", _sample(1, 0))
    with pytest.raises(ValueError, match="item 'p1' was written by shards 0 and 1 of 2"):
        second.close()
    assert not (tmp_path / ("out" + arrayrecord.MANIFEST_SUFFIX)).exists()
