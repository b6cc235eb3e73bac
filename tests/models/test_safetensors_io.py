"""The safetensors reader/writer against the reference `safetensors` package, and its errors."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from rdpo_jax.models import safetensors_io


def _spec(name, array):
    return safetensors_io.TensorSpec(name, array.dtype, array.shape, lambda: array)


def test_write_read_matches_reference_package(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((3, 5)).astype(np.float32), "b": np.arange(7, dtype=np.int64),
               "c": rng.standard_normal((4, 2)).astype(ml_dtypes.bfloat16)}
    assert safetensors_io.write(str(tmp_path), [_spec(k, v) for k, v in tensors.items()]) == ["model.safetensors"]
    ref = safetensors.numpy.load_file(str(tmp_path / "model.safetensors"))  # the reference parser agrees
    np.testing.assert_array_equal(ref["a"], tensors["a"])
    np.testing.assert_array_equal(ref["b"], tensors["b"])
    reader = safetensors_io.Reader(str(tmp_path))
    assert reader.keys() == ["a", "b", "c"] and reader.shape("a") == (3, 5)
    for k, v in tensors.items():
        assert reader.get(k).dtype == v.dtype
        np.testing.assert_array_equal(reader.get(k), v)
    assert isinstance(reader.get("a"), np.memmap)  # lazy: nothing read until sliced


def test_sharded_write_splits_by_size_and_indexes(tmp_path):
    arrays = {f"t{i}": np.full((256,), i, np.float32) for i in range(5)}  # 1 KiB each
    files = safetensors_io.write(str(tmp_path), [_spec(k, v) for k, v in arrays.items()], max_shard_bytes=2048)
    assert files[-1] == "model.safetensors.index.json" and len(files) == 4
    index = json.loads((tmp_path / files[-1]).read_text())
    assert index["metadata"]["total_size"] == 5 * 1024
    assert index["weight_map"]["t4"] == "model-00003-of-00003.safetensors"
    reader = safetensors_io.Reader(str(tmp_path))
    for k, v in arrays.items():
        np.testing.assert_array_equal(reader.get(k), v)


def test_reader_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        safetensors_io.Reader(str(tmp_path))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "gone.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="lists gone.safetensors, which does not exist"):
        safetensors_io.Reader(str(tmp_path))
    bad = tmp_path / "b"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(struct.pack("<Q", 10) + b"{not json}")
    with pytest.raises(safetensors_io.SafetensorsError, match="model.safetensors: header is not valid JSON"):
        safetensors_io.Reader(str(bad))
    header = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    (bad / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(safetensors_io.SafetensorsError, match="tensor 'x' has 8 bytes for shape"):
        safetensors_io.Reader(str(bad)).get("x")
