"""The model families and how to build one: a config type (read by `config.from_hf` from a
`config.json`'s `model_type`) maps to its model class (`llava.Llava`, `qwen_vl.QwenVL`)."""

from __future__ import annotations

import jax
from flax import nnx

from rdpo_jax import sharding
from rdpo_jax.models import layers
from rdpo_jax.models.config import LlavaConfig, QwenVLConfig, RunSettings
from rdpo_jax.models.llava import Llava
from rdpo_jax.models.qwen_vl import QwenVL
from rdpo_jax.models.vlm import VisionLanguageModel

MODELS = {LlavaConfig: Llava, QwenVLConfig: QwenVL}


def model_class(cfg) -> type[VisionLanguageModel]:
    return MODELS[type(cfg)]


def abstract_model(cfg, run: RunSettings = RunSettings()) -> VisionLanguageModel:
    """The model with ShapeDtypeStruct leaves: shapes, dtypes and logical axes, no memory."""
    cls = model_class(cfg)
    return nnx.eval_shape(lambda: cls(cfg, run, rngs=layers.InitKeys(jax.random.key(0))))


def create(cfg, run: RunSettings = RunSettings(), *, mesh: jax.sharding.Mesh | None = None,
           seed: int = 0) -> VisionLanguageModel:
    """A freshly initialized model whose parameters are born sharded on `mesh` (never whole on one host)."""
    cls = model_class(cfg)
    graphdef, abstract_state = nnx.split(abstract_model(cfg, run))
    shardings = sharding.state_shardings(abstract_state, mesh)
    init = jax.jit(lambda key: nnx.state(cls(cfg, run, rngs=layers.InitKeys(key))), out_shardings=shardings)
    return nnx.merge(graphdef, init(jax.random.key(seed)))
