"""A model's adapters (`models/lora.py`) as a PEFT LoRA folder: `adapter_config.json` and
`adapter_model.safetensors`, which `peft.PeftModel.from_pretrained(transformers_model, folder)` loads onto the
base in transformers with no missing or unexpected keys and the same function.

PEFT names a tensor `base_model.model.<module path in the transformers model in memory>.lora_{A,B}.weight`.
transformers 5 keeps a VLM's parts under `model.` (`model.language_model.…`, `model.visual.…`,
`model.vision_tower.…`, `model.multi_modal_projector.…`) and its head at `lm_head`, whatever the Hub files
say: our canonical name (`hf.hf_names`) with `model.` in front, `lm_head` as it is. `target_modules` and
`target_parameters` list the adapted modules and parameters by those full names, so that PEFT adapts exactly
those (a short name such as "q_proj" would also match the vision tower's).

Layouts, per layer (a scanned stack [L, …] gives one pair per layer), torch's [out, in]:

  projection  A [in, r], B [r, out]          lora_A [r, in], lora_B [out, r]
  fused       A [in, r], B [r, k, out]       lora_B [k·out, r] (PyTorch's one Linear for the k projections)
  experts     A [E, in, r], B [E, r, out]    PEFT's LoRA on a parameter (`target_parameters`, its
              `lora.ParamWrapper`): lora_A [E·r, in] expert-major, lora_B [out, r·E] rank-major; expert e
              computes x W_e + s · x A_e B_e, as here. Two adapted parameters of one experts module nest,
              the first one registered (gate_up_proj) innermost: its keys carry `.base_layer`.

Loads with peft ≥ 0.20 (checked: 0.20, 0.22). peft 0.18–0.19 load projections' adapters but read
transformers 5's experts [E, out, in] as [E, in, out] (shape errors); peft 0.17 does not import with
transformers 5.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from rdpo_jax.models import hf, lora

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."  # PeftModel's own prefix before the transformers model's module paths


def in_memory_name(canonical: str) -> str:
    """Our canonical transformers name -> its name in a transformers 5 model in memory."""
    return canonical if canonical.startswith("lm_head.") else "model." + canonical


def _host(variable) -> np.ndarray:
    """A parameter's value on the host (gathered across processes: every process must call this)."""
    value = variable.get_value()
    if value.is_fully_addressable:
        return np.asarray(jax.device_get(value), np.float32)
    return np.asarray(multihost_utils.process_allgather(value, tiled=True), np.float32)


def _torch_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One layer's (A, B) in PEFT's layout: a projection's (a [in, r], b [r, out…]) or experts' (a [E, in, r],
    b [E, r, out]); see the module docstring."""
    if a.ndim == 2:
        return a.T, b.reshape(b.shape[0], -1).T
    experts, _, rank = a.shape
    return a.transpose(0, 2, 1).reshape(experts * rank, -1), b.transpose(2, 1, 0).reshape(-1, rank * experts)


def adapter_tensors(model) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    """Every adapter of `model` in PEFT's names and layouts: (tensors, adapted module names, adapted parameter
    names), the names as transformers' model in memory has them."""
    tensors, modules, parameters = {}, [], []
    adapted: dict[str, list] = {}  # module path -> its adapted leaves, in `ADAPTABLE` order (PEFT's nesting)
    for module, leaf, name, _ in lora.weights(model):
        if getattr(module, leaf + "_lora_a", None) is not None:
            adapted.setdefault(name.rsplit("/", 1)[0], []).append((module, leaf, name))
    for leaves in adapted.values():
        for position, (module, leaf, name) in enumerate(leaves):
            a_var, b_var = getattr(module, leaf + "_lora_a"), getattr(module, leaf + "_lora_b")
            a, b = _host(a_var), _host(b_var)
            stacked = a_var.get_metadata().get("stacked_depth") is not None
            per_layer = a.ndim - (1 if stacked else 0)
            for i, canonical in enumerate(hf.hf_names(tuple(name.split("/")), a_var)):
                full = in_memory_name(canonical)
                if per_layer == 2:  # a projection: PEFT wraps the Linear module
                    owner = full.removesuffix(".weight")
                    modules.append(owner)
                else:  # stacked experts: PEFT wraps the parameter, nesting a module's second one around its first
                    owner = full.rsplit(".", 1)[0] + ".base_layer" * (len(leaves) - 1 - position)
                    parameters.append(full)
                tensors[_PREFIX + owner + ".lora_A.weight"], tensors[_PREFIX + owner + ".lora_B.weight"] = (
                    np.ascontiguousarray(x) for x in _torch_pair(a[i] if stacked else a, b[i] if stacked else b))
    return tensors, modules, parameters


def save_adapters(model, path: str, *, base_model_name_or_path: str, settings: lora.LoRASettings) -> list[str]:
    """Writes `model`'s adapters (float32, as trained) as a PEFT LoRA folder `path` over the base
    `base_model_name_or_path` (a Hub id or a folder: what `AutoPeftModel` loads the base from). On multi-host
    runs every process calls this (gathers are collective); process 0 writes. Returns the files written."""
    from safetensors.numpy import save_file

    tensors, modules, parameters = adapter_tensors(model)
    if not tensors:
        raise ValueError("save_adapters: the model has no adapters")
    if jax.process_index() != 0:
        return []
    alpha = settings.alpha
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": settings.rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": settings.dropout,
        "target_modules": sorted(modules) or None,
        "target_parameters": sorted(parameters) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
    save_file(dict(sorted(tensors.items())), os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt"})
    return [CONFIG_FILE, WEIGHTS_FILE]
