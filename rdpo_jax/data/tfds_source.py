"""TensorFlow Datasets: a builder for rDPO pairs (ArrayRecord format) and any TFDS ArrayRecord dataset as
a pipeline source. Works without TensorFlow installed (`tfds.data_source` reads ArrayRecord directly).

    builder = PairsBuilder(config=PairsConfig(name="mydata", splits={"train": "/data/pairs"}), data_dir=D)
    builder.download_and_prepare(file_format="array_record")
    source = TfdsSource("rdpo_pairs/mydata", split="train", data_dir=D)   # → pipeline.make_dataset

Each TFDS example of the builder is {"record": msgpack bytes of a validated pairs record}. For other
datasets pass `convert(example) -> record dict` and `kind`; the pipeline then validates the result like
any record.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import tensorflow_datasets as tfds

from rdpo_jax.data import arrayrecord, records


@dataclasses.dataclass
class PairsConfig(tfds.core.BuilderConfig):
    """splits: split name → path of an rdpo_jax pairs dataset (`folder/NAME`, with its manifest)."""
    splits: dict[str, str] = dataclasses.field(default_factory=dict)


class PairsBuilder(tfds.core.GeneratorBasedBuilder):
    """rDPO preference pairs as a TFDS dataset; records are validated while preparing."""

    name = "rdpo_pairs"
    VERSION = tfds.core.Version(f"{records.SCHEMA_VERSION}.0.0")
    RELEASE_NOTES = {f"{records.SCHEMA_VERSION}.0.0": f"rdpo_jax pairs records, schema {records.SCHEMA_VERSION}."}
    BUILDER_CONFIGS = [PairsConfig(name="default")]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description="Rubric-scored preference pairs (rdpo_jax msgpack records).",
            features=tfds.features.FeaturesDict({"record": tfds.features.Tensor(shape=(), dtype=np.object_)}))

    def _split_generators(self, dl_manager):
        del dl_manager
        if not self.builder_config.splits:
            raise ValueError("PairsConfig.splits is empty: map split names to rdpo_jax pairs datasets")
        return {split: self._generate_examples(path) for split, path in self.builder_config.splits.items()}

    def _generate_examples(self, path: str):
        source = arrayrecord.Source(path, kind="pairs")
        for i in range(len(source)):
            _, data = source[i]
            record = records.decode(data, "pairs", source.where(i))
            yield record["pair_id"], {"record": data}


class TfdsSource:
    """A TFDS ArrayRecord split as a pipeline source: `source[i] -> (i, record bytes)`."""

    def __init__(self, name: str, *, split: str, data_dir: str | None = None,
                 convert: Callable[[dict], dict] | None = None, kind: str = "pairs"):
        self.name, self.split, self.kind, self.convert = name, split, kind, convert
        self._data = tfds.data_source(name, split=split, data_dir=data_dir)

    def __len__(self) -> int:
        return len(self._data)

    def where(self, index: int) -> str:
        return f"tfds:{self.name}/{self.split}[{index}]"

    def __getitem__(self, index: int) -> tuple[int, bytes]:
        example = self._data[int(index)]
        if self.convert is None:
            return int(index), example["record"]
        return int(index), records.encode(self.convert(example), self.kind, self.where(index))
