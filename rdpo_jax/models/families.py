"""The model families, one folder each (`models/<family>/`, whose `FAMILY` says what it provides:
`vlm.Family`), and what everything else asks of them: which family a `config.json` or an architecture
config is, how to read one, how to build a model. Adding a family is its folder and one line here."""

from __future__ import annotations

import jax
from flax import nnx

from rdpo_jax import sharding
from rdpo_jax.models import layers, llava, qwen2_5_vl, qwen3_vl, qwen3_vl_moe
from rdpo_jax.models.config import RunSettings, UnsupportedConfigError
from rdpo_jax.models.vlm import Family, VisionLanguageModel

FAMILIES: dict[str, Family] = {f.model_type: f for f in (llava.FAMILY, qwen2_5_vl.FAMILY, qwen3_vl.FAMILY,
                                                                 qwen3_vl_moe.FAMILY)}


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


def abstract_model(cfg, run: RunSettings = RunSettings()) -> VisionLanguageModel:
    """The model with ShapeDtypeStruct leaves: shapes, dtypes and logical axes, no memory."""
    cls = of(cfg).model
    return nnx.eval_shape(lambda: cls(cfg, run, rngs=layers.InitKeys(jax.random.key(0))))


def create(cfg, run: RunSettings = RunSettings(), *, mesh: jax.sharding.Mesh | None = None,
           seed: int = 0) -> VisionLanguageModel:
    """A freshly initialized model whose parameters are born sharded on `mesh` (never whole on one host)."""
    cls = of(cfg).model
    graphdef, abstract_state = nnx.split(abstract_model(cfg, run))
    shardings = sharding.state_shardings(abstract_state, mesh)
    init = jax.jit(lambda key: nnx.state(cls(cfg, run, rngs=layers.InitKeys(key))), out_shardings=shardings)
    return nnx.merge(graphdef, init(jax.random.key(seed)))
