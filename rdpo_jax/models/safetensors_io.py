"""Minimal safetensors reader/writer that never holds a whole model in host memory.

Reading memory-maps each file and returns lazy numpy views, so a caller slicing one device's shard
touches only those bytes. Writing streams tensor by tensor into files of at most `max_shard_bytes`,
with `model.safetensors.index.json` when there is more than one (the layout transformers writes).
Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, data.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsError(ValueError):
    """A safetensors file or index is malformed."""


def _read_header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 2**20:
            raise SafetensorsError(f"{path}: header length {n} is implausible")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from e
    header.pop("__metadata__", None)
    return header, 8 + n


class Reader:
    """All tensors of a checkpoint folder (`model.safetensors`, or shards listed by the index)."""

    def __init__(self, folder: str):
        index = os.path.join(folder, INDEX_FILE)
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.exists(os.path.join(folder, SINGLE_FILE)):
            files = [SINGLE_FILE]
        else:
            raise FileNotFoundError(f"{folder}: neither {SINGLE_FILE} nor {INDEX_FILE} exists")
        self._entries: dict[str, tuple[str, dict, int]] = {}
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.exists(path):
                raise FileNotFoundError(f"{index}: lists {name}, which does not exist")
            header, start = _read_header(path)
            for key, info in header.items():
                if key in self._entries:
                    raise SafetensorsError(f"{path}: tensor {key!r} also stored in {self._entries[key][0]}")
                if info["dtype"] not in DTYPES:
                    raise SafetensorsError(f"{path}: tensor {key!r} has unsupported dtype {info['dtype']}")
                self._entries[key] = (path, info, start)
        self._maps: dict[str, np.memmap] = {}

    def keys(self) -> list[str]:
        return sorted(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key][1]["shape"])

    def get(self, key: str) -> np.ndarray:
        """A lazy (memory-mapped) view of one tensor; slicing it reads only the bytes needed."""
        path, info, start = self._entries[key]
        if path not in self._maps:
            self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        begin, end = info["data_offsets"]
        dtype = np.dtype(DTYPES[info["dtype"]])
        shape = tuple(info["shape"])
        if end - begin != int(np.prod(shape)) * dtype.itemsize:
            raise SafetensorsError(f"{path}: tensor {key!r} has {end - begin} bytes for shape {shape} {dtype}")
        return self._maps[path][start + begin:start + end].view(dtype).reshape(shape)


@dataclass(frozen=True)
class TensorSpec:
    """One tensor to write: its name, dtype, shape and a function producing its value (numpy)."""
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    value: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def _write_file(path: str, specs: list[TensorSpec], metadata: dict[str, str]):
    header: dict = {"__metadata__": metadata}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": CODES[np.dtype(s.dtype)], "shape": list(s.shape),
                          "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes, as the reference writer does
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for s in specs:
            value = np.ascontiguousarray(s.value(), dtype=s.dtype)
            if value.shape != s.shape:
                raise SafetensorsError(f"tensor {s.name!r}: produced shape {value.shape}, declared {s.shape}")
            f.write(value.tobytes())
    os.replace(tmp, path)


def write(folder: str, specs: Iterable[TensorSpec], *, max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Writes `specs` as one `model.safetensors` or as `model-0000i-of-0000n.safetensors` + index.

    Returns the file names written. Each tensor is produced (and freed) one at a time.
    """
    specs = list(specs)
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    metadata = {"format": "pt"}  # transformers refuses safetensors files without a known format
    if len(shards) == 1:
        _write_file(os.path.join(folder, SINGLE_FILE), shards[0], metadata)
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        _write_file(os.path.join(folder, name), shard, metadata)
        weight_map.update({s.name: name for s in shard})
    index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(folder, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)
    return names + [INDEX_FILE]
