"""The model families, one folder each (`models/<family>/`, whose `FAMILY` says what it provides:
`vlm.Family`), and what everything else asks of them: which family a `config.json` or an architecture
config is, how to read one, how to build a model. Adding a family is its folder and one line here."""

from __future__ import annotations

import dataclasses
import warnings

import jax
from flax import nnx

from rdpo_jax import sharding
from rdpo_jax.models import layers, llava, lora, qwen2_5_vl, qwen3_5, qwen3_5_moe, qwen3_vl, qwen3_vl_moe
from rdpo_jax.models.config import RunSettings, UnsupportedConfigError
from rdpo_jax.models.vlm import Family, VisionLanguageModel

FAMILIES: dict[str, Family] = {f.model_type: f for f in (llava.FAMILY, qwen2_5_vl.FAMILY, qwen3_vl.FAMILY,
                                                                 qwen3_vl_moe.FAMILY, qwen3_5.FAMILY,
                                                                 qwen3_5_moe.FAMILY)}


def get(model_type: str) -> Family:
    """The family of a `config.json`'s `model_type`."""
    if model_type not in FAMILIES:
        raise UnsupportedConfigError(f"model_type: {model_type!r} is not supported; supported: {list(FAMILIES)}")
    return FAMILIES[model_type]


def of(cfg) -> Family:
    """The family of an architecture config (what `from_hf` returned) or of a model."""
    for family in FAMILIES.values():
        if type(cfg) in (family.config, family.model):  # exact types: a family may subclass another's
            return family
    raise TypeError(f"{type(cfg).__name__} is not the architecture config of a registered family")


def from_hf(hf):
    """Reads a transformers config (or a `config.json` dict) of a registered `model_type` into the family's
    architecture config."""
    import transformers  # heavy import, only where configs are read

    model_type = hf.get("model_type") if isinstance(hf, dict) else hf.model_type
    family = get(model_type)
    if isinstance(hf, dict):
        hf = transformers.AutoConfig.for_model(model_type, **{k: v for k, v in hf.items() if k != "model_type"})
    return family.from_hf(hf)


def _build(cfg, run: RunSettings, key: jax.Array) -> VisionLanguageModel:
    """The family's model with `run.lora`'s adapters (and quantized base) attached."""
    rngs = layers.InitKeys(key)
    model = of(cfg).model(cfg, run, rngs=rngs)
    return model if run.lora is None else lora.attach(model, run.lora, rngs)


def abstract_model(cfg, run: RunSettings = RunSettings()) -> VisionLanguageModel:
    """The model with ShapeDtypeStruct leaves: shapes, dtypes and logical axes, no memory."""
    return nnx.eval_shape(lambda: _build(cfg, run, jax.random.key(0)))


def create(cfg, run: RunSettings = RunSettings(), *, mesh: jax.sharding.Mesh | None = None,
           seed: int = 0) -> VisionLanguageModel:
    """A freshly initialized model whose parameters are born sharded on `mesh` (never whole on one host)."""
    graphdef, abstract_state = nnx.split(abstract_model(cfg, run))
    shardings = sharding.state_shardings(abstract_state, mesh)
    init = jax.jit(lambda key: nnx.state(_build(cfg, run, key)), out_shardings=shardings)
    return nnx.merge(graphdef, init(jax.random.key(seed)))


def adapt(model: VisionLanguageModel, settings: lora.LoRASettings, *, seed: int = 0) -> VisionLanguageModel:
    """A loaded base model with adapters attached (and its base quantized) on the mesh its parameters live
    on, in one jit that consumes the base's state (its float weights are freed as codes replace them)."""
    model.run = dataclasses.replace(model.run, lora=settings)  # what `abstract_model(model.config, model.run)` builds
    graphdef, state = nnx.split(model)
    target = nnx.eval_shape(lambda: lora.attach(nnx.merge(graphdef, state), settings, layers.InitKeys(jax.random.key(0))))
    target_graphdef, target_state = nnx.split(target)
    mesh = sharding.mesh_of(state)
    init = jax.jit(lambda state, key: nnx.state(lora.attach(nnx.merge(graphdef, state), settings, layers.InitKeys(key))),
                   out_shardings=sharding.state_shardings(target_state, mesh), donate_argnums=0)
    with warnings.catch_warnings():  # quantized weights' float buffers are donated to be freed, not reused
        warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
        return nnx.merge(target_graphdef, init(state, jax.random.key(seed)))
