"""Qwen3.5-MoE's architecture config, read from a transformers `Qwen3_5MoeConfig`: Qwen3.5's, whose every
decoder MLP is sparse, with a shared expert (`TextConfig.moe`)."""

from __future__ import annotations

import dataclasses

from rdpo_jax.models.config import require
from rdpo_jax.models.qwen3_5 import config as qwen3_5


@dataclasses.dataclass(frozen=True)
class Qwen35MoeConfig(qwen3_5.Qwen35Config):
    """The architecture of a Qwen3.5-MoE model: `text.moe` holds the experts, the router and the shared expert."""


def from_hf(hf) -> Qwen35MoeConfig:
    dense = qwen3_5.from_hf(hf)
    moe = dense.text.moe
    require(moe is not None, "text_config.num_experts", "a Qwen3.5-MoE needs num_experts > 0")
    # transformers makes every layer sparse: a stray mlp_only_layers / decoder_sparse_step in the file is not read
    text = dataclasses.replace(dense.text, moe=dataclasses.replace(moe, layers=tuple(range(dense.text.num_layers))))
    return Qwen35MoeConfig(**{f.name: getattr(dense, f.name) for f in dataclasses.fields(dense)} | dict(text=text))
