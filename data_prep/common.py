"""What every data_prep command shares: shard selection, resumable chunked output, progress, summaries.

Output of a command = one dataset `NAME` (ArrayRecord + manifest) written by `--num_shards` independent
runs (hosts, or JAX processes with --num_shards=0, joined as `train` joins them: `--distributed_*` flags
here, the training config's `distributed` group in ref_logps). Each shard writes chunks
`NAME-s00001-of-00004-c00012.array_record`, each committed by its `.keys.json` (the item keys in it), so
a restarted run skips every item already written. A chunk holds whole items (all records of a key), so
a kill never leaves an item marked done with records missing. When the last shard finishes,
`NAME.manifest.json` lists all chunks.

The output is a function of the input alone, whatever the sharding and however often a run is killed:
a command that computes items in batches (sample, judge, ref_logps) forms its batches from the whole
input, the same for every shard count, and a shard takes whole batches (`batches[index::count]`); a
batch left partly done by a kill is computed again whole and only its undone items are written, so that
every item is computed among the same neighbours (padding, shapes and thus bits) as in one uninterrupted
run.

Testing only: RDPO_TEST_KILL_AT_RECORD=k makes the process SIGKILL itself when the k-th record of the run
is added (before it is buffered), a deterministic crash for the restart tests.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import signal
import sys

from absl import app, flags

from rdpo_jax.data import arrayrecord, records

SHARD_INDEX = flags.DEFINE_integer("shard_index", 0, "This run's shard of the input.")
NUM_SHARDS = flags.DEFINE_integer("num_shards", 1, "Shards of the input (0: one per JAX process).")
CHUNK = flags.DEFINE_integer("chunk_size", 64, "Records per output chunk (the unit of resumption), at least; "
                             "a chunk ends at an item boundary, so it may hold an item's records more.")
# How the JAX processes of --num_shards=0 join: the names and meaning of the config's `distributed` group
_COORDINATOR = flags.DEFINE_string("distributed_coordinator", "", "HOST:PORT of process 0's coordinator, for "
                                   "JAX processes without auto-detection (CPU, or GPU hosts without SLURM).")
_NUM_PROCESSES = flags.DEFINE_integer("distributed_num_processes", 0, "With --distributed_coordinator: processes.")
_PROCESS_ID = flags.DEFINE_integer("distributed_process_id", -1, "With --distributed_coordinator: this process.")
_AUTO = flags.DEFINE_bool("distributed_auto", False, "Call jax.distributed.initialize() with no arguments "
                          "(TPU pods, SLURM, GPU clusters).")
_DISTRIBUTED_FLAGS = (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID, _AUTO)
KILL_AT_ENV = "RDPO_TEST_KILL_AT_RECORD"  # testing only: see the module docstring


@dataclasses.dataclass(frozen=True)
class Distributed:
    """The `--distributed_*` flags in the shape of a config's `distributed` group (`sharding.init_distributed`)."""
    coordinator: str
    num_processes: int
    process_id: int
    auto: bool


def shard(distributed=None) -> tuple[int, int]:
    """Joins this command's JAX processes as `train` does, then (shard index, shard count): the flags', or this
    JAX process's when --num_shards=0.

    Args:
      distributed: a training config's `distributed` group (ref_logps), else the `--distributed_*` flags.
    """
    if distributed is None:
        distributed = Distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _AUTO.value)
    elif any(f.present for f in _DISTRIBUTED_FLAGS):
        raise app.UsageError("this command joins JAX processes as its training config says "
                             "(--config.distributed.coordinator, …), not by --distributed_* flags")
    if NUM_SHARDS.value < 0:
        raise app.UsageError(f"--num_shards={NUM_SHARDS.value}: expected a shard count, or 0 (one per JAX process)")
    if distributed.coordinator or distributed.auto:
        from rdpo_jax import sharding  # imports jax: build_rubrics, make_pairs and the verifier judge need none

        sharding.init_distributed(distributed)
    if NUM_SHARDS.value == 0:
        import jax

        if jax.process_count() == 1:
            print("--num_shards=0 with one JAX process: this run writes the whole output (join the processes of "
                  "several hosts with --distributed_auto or --distributed_coordinator)")
        return jax.process_index(), jax.process_count()
    if not 0 <= SHARD_INDEX.value < NUM_SHARDS.value:
        raise app.UsageError(f"--shard_index={SHARD_INDEX.value} is not in [0, --num_shards={NUM_SHARDS.value})")
    return SHARD_INDEX.value, NUM_SHARDS.value


class Output:
    """One shard's resumable output: records buffered by item key and committed in chunks of whole items.

    Args:
      folder, name, kind: the dataset (folder/NAME) and its record kind.
      shard_index, num_shards: this run's shard.
      chunk_size: a chunk is committed once it holds at least this many records and the next record
        belongs to another item (or at `close`).

    Records of one item must be added consecutively. `done` holds the keys of the committed items.
    """

    def __init__(self, folder: str, name: str, kind: str, shard_index: int, num_shards: int, chunk_size: int = 64):
        os.makedirs(folder, exist_ok=True)
        self.folder, self.name, self.kind = folder, name, kind
        self.prefix = f"{name}-s{shard_index:05d}-of-{num_shards:05d}"
        self.num_shards, self.chunk_size = num_shards, chunk_size
        self.creator = " ".join(sys.argv)
        self.chunks = sorted(p[:-len(".keys.json")] for p in glob.glob(os.path.join(folder, self.prefix + "-c*.keys.json")))
        self._check_kind()
        self.done: set[str] = set()
        for chunk in self.chunks:
            with open(chunk + ".keys.json") as f:
                self.done |= set(json.load(f))
        self._buffer: list[tuple[str, bytes]] = []
        self.written = 0
        self._added, self._kill_at = 0, int(os.environ.get(KILL_AT_ENV) or 0)

    def _check_kind(self) -> None:
        """A rerun resumes what an earlier run wrote under this name only if it writes the same record kind
        (say, `make_pairs --format=groups` after `--format=pairs`): else a ValueError, not a mixed dataset."""
        manifest = os.path.join(self.folder, self.name + arrayrecord.MANIFEST_SUFFIX)
        found = arrayrecord.read_manifest(manifest)["kind"] if os.path.exists(manifest) else None
        if found is None and self.chunks:
            from array_record.python.array_record_module import ArrayRecordReader

            for chunk in self.chunks:
                reader = ArrayRecordReader(chunk + ".array_record")
                first = reader.read([0])[0] if reader.num_records() else None
                reader.close()
                if first is not None:
                    found = next((k for k in (self.kind,) + records.KINDS if _decodes(first, k)), "unreadable")
                    break
        if found is not None and found != self.kind:
            raise ValueError(f"{os.path.join(self.folder, self.name)}: an earlier run wrote {found!r} records there; "
                             f"this one writes {self.kind!r} records. Use another --name or --out (or delete it)")

    def add(self, key: str, record: dict) -> None:
        """Buffers one record (validated now); `key` marks its input item as done once its chunk commits."""
        self._added += 1
        if self._added == self._kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        self._append(key, records.encode(record, self.kind, f"{self.name} output for {key}"))

    def mark_done(self, key: str) -> None:
        """An input item that produced no record (e.g. a prompt without a pair) is done too."""
        self._append(key, b"")

    def _append(self, key: str, data: bytes) -> None:
        # Commit only between items: a chunk committed in the middle of an item would mark its key done
        # while the item's later records are still in the buffer, lost if the process dies before the next.
        if len(self._buffer) >= self.chunk_size and key != self._buffer[-1][0]:
            self.flush()
        self._buffer.append((key, data))

    def flush(self) -> None:
        """Commits the buffer as one chunk (callers flush between items only)."""
        if not self._buffer:
            return
        from array_record.python.array_record_module import ArrayRecordWriter

        path = os.path.join(self.folder, f"{self.prefix}-c{len(self.chunks):05d}")
        writer = ArrayRecordWriter(path + ".array_record.tmp", "group_size:1")
        for _, data in self._buffer:
            if data:
                writer.write(data)
        writer.close()
        os.replace(path + ".array_record.tmp", path + ".array_record")
        with open(path + ".keys.json.tmp", "w") as f:
            json.dump(sorted({k for k, _ in self._buffer}), f)
        os.replace(path + ".keys.json.tmp", path + ".keys.json")  # the commit point of the chunk
        self.chunks.append(path)
        self.done |= {k for k, _ in self._buffer}
        self.written += sum(1 for _, d in self._buffer if d)
        self._buffer = []

    def close(self) -> dict | None:
        """Flushes, writes this shard's manifest; the last shard to finish writes the dataset manifest."""
        self.flush()
        files = [(os.path.basename(c) + ".array_record", _count(c)) for c in self.chunks]
        arrayrecord.write_manifest(self.folder, self.prefix, self.kind, files, self.creator)
        shard_manifests = [os.path.join(self.folder, f"{self.name}-s{i:05d}-of-{self.num_shards:05d}"
                                        + arrayrecord.MANIFEST_SUFFIX) for i in range(self.num_shards)]
        if not all(os.path.exists(p) for p in shard_manifests):
            return None
        self._check_disjoint()
        everything = []
        for p in shard_manifests:
            everything += [(s["file"], s["count"]) for s in arrayrecord.read_manifest(p)["shards"]]
        return arrayrecord.write_manifest(self.folder, self.name, self.kind, everything, self.creator)


    def _check_disjoint(self) -> None:
        """Every item is one shard's: an item committed by two shards (shards run with different shard
        counts or input orders, or a shard resumed by a release that assigns items to shards otherwise)
        would be in the dataset twice. Checked from the chunks themselves before the dataset manifest
        vouches for them; raises ValueError naming the item and both shards."""
        owner: dict[str, int] = {}
        for i in range(self.num_shards):
            prefix = f"{self.name}-s{i:05d}-of-{self.num_shards:05d}"
            for path in sorted(glob.glob(os.path.join(self.folder, prefix + "-c*.keys.json"))):
                with open(path) as f:
                    for key in json.load(f):
                        if owner.setdefault(key, i) != i:
                            raise ValueError(
                                f"{os.path.join(self.folder, self.name)}: item {key!r} was written by shards "
                                f"{owner[key]} and {i} of {self.num_shards}; the shards disagree on which items "
                                "are whose (another input, or runs of another release?). Write into a new --out")


def _decodes(data: bytes, kind: str) -> bool:
    try:
        records.decode(data, kind, "")
        return True
    except records.RecordError:
        return False


def pool_index(path: str) -> tuple[arrayrecord.Source, dict[str, int]]:
    """The rubric pool and prompt_id → index in it (one pass; records are fetched again when needed)."""
    source = arrayrecord.Source(path, "rubric_pool")
    index = {}
    for i in range(len(source)):
        index[records.decode(source[i][1], "rubric_pool", source.where(i))["prompt_id"]] = i
    return source, index


def _count(chunk: str) -> int:
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(chunk + ".array_record")
    n = reader.num_records()
    reader.close()
    return n


def summary(title: str, counts: dict, path: str | None = None) -> None:
    """Prints a command's summary and saves it as JSON next to its output."""
    print(f"\n{title}")
    for k, v in counts.items():
        print(f"  {k}: {v}")
    if path:
        with open(path, "w") as f:
            json.dump(counts, f, indent=2)
