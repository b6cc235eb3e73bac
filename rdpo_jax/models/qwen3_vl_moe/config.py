"""Qwen3-VL-MoE's architecture config, read from a transformers `Qwen3VLMoeConfig`: Qwen3-VL's, whose
decoder has sparse MoE MLPs (`TextConfig.moe`)."""

from __future__ import annotations

import dataclasses

from rdpo_jax.models.config import require
from rdpo_jax.models.qwen3_vl import config as qwen3_vl


@dataclasses.dataclass(frozen=True)
class Qwen3VLMoeConfig(qwen3_vl.Qwen3VLConfig):
    """The architecture of a Qwen3-VL-MoE model: `text.moe` says which layers are sparse and how."""


def from_hf(hf) -> Qwen3VLMoeConfig:
    dense = qwen3_vl.from_hf(hf)
    require(dense.text.moe is not None, "text_config.num_experts", "a Qwen3-VL-MoE needs num_experts > 0")
    return Qwen3VLMoeConfig(**{f.name: getattr(dense, f.name) for f in dataclasses.fields(dense)})
