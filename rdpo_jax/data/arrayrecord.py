"""Sharded ArrayRecord files of msgpack records, with a JSON manifest.

A dataset `NAME` in a folder is `NAME-00000-of-00008.array_record`, … plus `NAME.manifest.json`:
{kind, schema_version, count, shards: [{file, count}], creator, created}. Records are assigned to shards
round-robin, so shards stay balanced for any count. Files are written with group_size 1 (random access,
which global shuffling needs).
"""

from __future__ import annotations

import bisect
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence

from array_record.python import array_record_module

from rdpo_jax.data import records

MANIFEST_SUFFIX = ".manifest.json"


def shard_name(name: str, index: int, num_shards: int) -> str:
    return f"{name}-{index:05d}-of-{num_shards:05d}.array_record"


def manifest_path(folder: str, name: str) -> str:
    return os.path.join(folder, name + MANIFEST_SUFFIX)


class Writer:
    """Writes validated records of one kind round-robin into `num_shards` files; `close()` writes the
    manifest (only then is the dataset complete: readers require the manifest)."""

    def __init__(self, folder: str, name: str, kind: str, *, num_shards: int = 1, creator: str | None = None):
        if kind not in records.KINDS:
            raise ValueError(f"unknown record kind {kind!r}; kinds: {records.KINDS}")
        os.makedirs(folder, exist_ok=True)
        self.folder, self.name, self.kind = folder, name, kind
        self.creator = creator if creator is not None else " ".join(sys.argv)
        self.files = [shard_name(name, i, num_shards) for i in range(num_shards)]
        self._writers = [array_record_module.ArrayRecordWriter(os.path.join(folder, f), "group_size:1")
                         for f in self.files]
        self.counts = [0] * num_shards
        self.manifest: dict | None = None

    def write(self, record: dict) -> None:
        i = sum(self.counts) % len(self._writers)
        data = records.encode(record, self.kind, f"{self.name} record {sum(self.counts)}")
        self._writers[i].write(data)
        self.counts[i] += 1

    def close(self) -> dict:
        if self.manifest is not None:
            return self.manifest
        for w in self._writers:
            w.close()
        self.manifest = write_manifest(self.folder, self.name, self.kind, list(zip(self.files, self.counts)),
                                       self.creator)
        return self.manifest

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:  # never write a manifest that would vouch for a partial dataset
            for w in self._writers:
                w.close()
            self.manifest = {}


def write_manifest(folder: str, name: str, kind: str, files: list[tuple[str, int]], creator: str) -> dict:
    """Writes `NAME.manifest.json` (atomically) for ArrayRecord `files` [(file name, record count)]."""
    manifest = {"kind": kind, "schema_version": records.SCHEMA_VERSION, "count": sum(c for _, c in files),
                "shards": [{"file": f, "count": c} for f, c in files], "creator": creator,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = manifest_path(folder, name) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(tmp, manifest_path(folder, name))
    return manifest


def write(folder: str, name: str, kind: str, items: Iterable[dict], *, num_shards: int = 1,
          creator: str | None = None) -> dict:
    """Writes all `items`; returns the manifest."""
    with Writer(folder, name, kind, num_shards=num_shards, creator=creator) as w:
        for item in items:
            w.write(item)
    return w.manifest


def read_manifest(path: str) -> dict:
    """Reads `NAME.manifest.json` (or the manifest of a dataset given as `folder/NAME`)."""
    if not path.endswith(MANIFEST_SUFFIX):
        path += MANIFEST_SUFFIX
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no manifest (was the dataset written completely?)")
    with open(path) as f:
        manifest = json.load(f)
    version = manifest.get("schema_version")
    if version not in records.READABLE_SCHEMA_VERSIONS:  # older versions' records are valid records of this one
        raise ValueError(f"{path}: schema_version {version} is not one this code reads "
                         f"({records.READABLE_SCHEMA_VERSIONS.start}…{records.SCHEMA_VERSION})")
    manifest["folder"] = os.path.dirname(os.path.abspath(path))
    return manifest


class Source:
    """Random access to the raw records of one or more datasets (grain's data-source protocol):
    `source[i] -> (i, bytes)`, with `locate(i)` naming the file and index within it for error messages."""

    def __init__(self, paths: str | Sequence[str], kind: str | None = None):
        paths = [paths] if isinstance(paths, str) else list(paths)
        self.kind = kind
        self._files: list[tuple[str, int]] = []
        for p in paths:
            m = read_manifest(p)
            if self.kind is None:
                self.kind = m["kind"]
            if m["kind"] != self.kind:
                raise ValueError(f"{p}: holds {m['kind']!r} records, expected {self.kind!r}")
            for shard in m["shards"]:
                self._files.append((os.path.join(m["folder"], shard["file"]), shard["count"]))
        self._starts = [0]
        for _, n in self._files:
            self._starts.append(self._starts[-1] + n)
        self._readers: dict[int, array_record_module.ArrayRecordReader] = {}

    def __len__(self) -> int:
        return self._starts[-1]

    def _shard(self, index: int) -> int:
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range [0, {len(self)})")
        return bisect.bisect_right(self._starts, index) - 1

    def locate(self, index: int) -> tuple[str, int]:
        f = self._shard(index)
        return self._files[f][0], index - self._starts[f]

    def where(self, index: int) -> str:
        file, local = self.locate(index)
        return f"{os.path.basename(file)}[{local}]"

    def __getitem__(self, index: int) -> tuple[int, bytes]:
        index = int(index)
        f = self._shard(index)
        if f not in self._readers:  # opened lazily: each grain worker process opens its own
            self._readers[f] = array_record_module.ArrayRecordReader(self._files[f][0], "readahead_buffer_size:0")
        return index, self._readers[f].read([index - self._starts[f]])[0]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_readers"] = {}
        return state

    def __repr__(self) -> str:
        return f"Source({len(self)} {self.kind} records in {len(self._files)} files)"


def read(paths: str | Sequence[str], kind: str | None = None) -> Iterator[dict]:
    """Decoded, validated records in source order (for tools; training reads through the pipeline)."""
    source = Source(paths, kind)
    for i in range(len(source)):
        _, data = source[i]
        yield records.decode(data, source.kind, source.where(i))
