"""A model ready to answer prompts: what `data_prep.sample`, `rdpo_jax.evaluate`, `data_prep.ref_logps`, the
local Flax judge and the server start from.

`load(source, mesh=…)` reads a Hugging Face folder or a training run (its latest checkpoint) straight
onto a mesh of this process's devices — FSDP over all of them by default, so that a model larger than
one device's memory still loads — with the chat tokenizer and the image preprocessing of its model
folder. Placeholders are checked on the host by the tokenizer, so the compiled programs stay cacheable.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax

from rdpo_jax import checkpoint, sampling, sharding
from rdpo_jax.data import images
from rdpo_jax.data.tokenize import ChatTokenizer
from rdpo_jax.models import config as config_lib
from rdpo_jax.models import image_inputs

DEFAULT_MESH = "fsdp=-1"
MAX_PROMPT_IMAGES = 16  # images one prompt may hold
MESH_HELP = ("Mesh over this process's devices as AXIS=SIZE,… over data, fsdp, tensor (-1: the rest, missing "
             "axes 1), e.g. 'fsdp=-1' (parameters split over all devices) or 'data=-1' (a copy per device).")


def parse_mesh(text: str) -> dict[str, int]:
    """'fsdp=-1' or 'data=2,tensor=4' -> a full mesh shape {data, fsdp, tensor}."""
    shape = {axis: 1 for axis in sharding.MESH_AXES}
    for part in filter(None, (p.strip() for p in text.split(","))):
        axis, eq, size = part.partition("=")
        if axis not in shape or not eq or not size.lstrip("-").isdigit():
            raise ValueError(f"mesh {text!r}: expected AXIS=SIZE,… with AXIS in {sharding.MESH_AXES}, got {part!r}")
        shape[axis] = int(size)
    return shape


def local_mesh(shape: str | dict, devices=None) -> jax.sharding.Mesh:
    """`shape` over this process's devices (or `devices`: one host's); an FSDP mesh of them if it does not
    fit (e.g. a pod's training mesh given to a one-host command), said on the console."""
    shape = parse_mesh(shape) if isinstance(shape, str) else dict(shape)
    devices = jax.local_devices() if devices is None else list(devices)
    try:
        return sharding.make_mesh(shape, devices=devices)
    except ValueError as e:
        print(f"mesh {shape} does not fit this process's {len(devices)} devices ({e}); using an FSDP mesh over them")
        return sharding.make_mesh(parse_mesh(DEFAULT_MESH), devices=devices)


@dataclasses.dataclass(frozen=True)
class Policy:
    model: Any  # the Flax model, parameters placed on `mesh`
    config: object  # the family's architecture config (`models.families.from_hf`)
    folder: str  # the HF folder holding the architecture, tokenizer and processor
    step: int | None  # the checkpoint step of a run, None for an HF folder
    tokenizer: ChatTokenizer
    image_input: Any  # the family's `image_inputs` adapter (no images if the folder has no image processor)
    mesh: jax.sharding.Mesh

    def sampling_config(self, **options) -> sampling.SamplingConfig:
        """Sampling settings (`options`: max_new_tokens, temperature, …) that stop at every stop id of
        the tokenizer (eos, the generation config's eos ids, the template's end of turn) and never emit
        the image placeholder (training would splice an image into it)."""
        return sampling.SamplingConfig(**self._model_ids, **options)

    @functools.cached_property
    def _model_ids(self) -> dict:  # read once: the server asks per request
        return {"stop_ids": self.tokenizer.stop_ids(), "pad_id": self.tokenizer.pad_id,
                "suppress_ids": (self.config.image_token_id,)}


def load(source: str, *, mesh: str | dict | jax.sharding.Mesh = DEFAULT_MESH, run: config_lib.RunSettings | None = None,
         model_path: str | None = None, step: int | None = None) -> Policy:
    """`source` (an HF folder or a run directory) on `mesh` (a Mesh, or a shape for `local_mesh`).

    `run`: dtypes and remat (default float32); `model_path`: the HF folder whose architecture,
    tokenizer and processor to use (default: the folder itself, or the run's `model.path`); `step`: a
    run's checkpoint step (default: the latest)."""
    if not isinstance(mesh, jax.sharding.Mesh):
        mesh = local_mesh(mesh)
    run = dataclasses.replace(run or config_lib.RunSettings(), check_image_tokens=False)
    model, cfg, folder, step = checkpoint.load_model(source, run, mesh=mesh, step=step, model_path=model_path)
    folder = model_path or folder
    tokenizer = ChatTokenizer(folder, image_token_id=cfg.image_token_id)
    try:
        images.processor_dict(folder)
        max_images = MAX_PROMPT_IMAGES
    except FileNotFoundError:
        max_images = 0  # text-only prompts (an image in a prompt is then an error naming the count)
    image_input = image_inputs.for_model(cfg, folder, max_images=max_images)
    return Policy(model, cfg, folder, step, tokenizer, image_input, mesh)
