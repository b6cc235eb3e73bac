"""What every vision-language family shares: image features spliced over placeholder tokens, the text
decoder, the (tied or separate) LM head.

A family's model (`llava/model.py`, `qwen2_5_vl/model.py`) subclasses `VisionLanguageModel`: it builds `language_model` (a
`TextDecoder`), optionally `lm_head`, its vision side, and implements `image_features(images)`, where
`images` is the family's image input (LLaVA: pixels; Qwen2.5-VL: a packed patch buffer with metadata)
and `images_of(batch)`, which picks it from a batch dict. Features come with a per-row count, so that
rows may hold different numbers of image tokens; computing them apart from the decoder lets callers
encode a pair's images once for both rows of the concat layout. A family whose decoder reads image
features again after its first layers (Qwen3-VL's DeepStack) returns them as `Features.deepstack`, and
`decode` adds them there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from types import ModuleType
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from rdpo_jax import sharding
from rdpo_jax.models import layers

ACT = ("batch", "seq", "act_embed")


class ImageTokenMismatchError(ValueError):
    """The image placeholders of a row do not match the image features given for it."""


class Features(NamedTuple):
    """A batch's image features, every leaf batch-major (rows repeat with `jnp.repeat(…, axis=0)`)."""
    feats: jax.Array  # float[B, F, D] in placeholder order
    counts: jax.Array  # int32[B]: the row's valid features
    # float[B, K, F, D]: added to the hidden states at the placeholders after decoder layers 0…K−1
    deepstack: jax.Array | None = None


class VisionLanguageModel(nnx.Module):
    """Call: `model(input_ids, images=None, attention_mask=None, positions=None) -> logits float32[B, T, V]`.

    Args (of `__call__`):
      input_ids: int32[B, T]; `config.image_token_id` marks the image placeholders.
      images: the family's image input (see the subclass), or None (text only).
      attention_mask: int32[B, T] padding mask (1 = token), giving a causal + padding mask; or an
        explicit bool[B, T, T] mask (True = query t may attend key s) for packed layouts; None = causal.
      positions: int32[B, T] RoPE positions (int32[B, 3, T] for M-RoPE families); default 0..T-1.
    """

    # ----- the family's part (and `config`, `run`, `language_model`, `lm_head` if untied) -----

    def image_features(self, images) -> Features:
        raise NotImplementedError

    @staticmethod
    def images_of(batch: dict):
        """The family's image input from a batch dict (None if the batch has no images)."""
        raise NotImplementedError

    # ----- shared -----

    def embed(self, input_ids: jax.Array, features: Features | None) -> jax.Array:
        """Token embeddings with image features written over the placeholders, in order: float[B, T, D]."""
        x = sharding.shard_activation(self.language_model.embed_tokens(input_ids), ACT)
        is_image = input_ids == self.config.image_token_id
        if features is None:
            _check_image_tokens(is_image, jnp.zeros(input_ids.shape[0], jnp.int32), self.run.check_image_tokens)
            return x
        feats = sharding.shard_activation(features.feats.astype(x.dtype), ACT)
        _check_image_tokens(is_image, features.counts, self.run.check_image_tokens)
        return jnp.where(is_image[..., None], _splice(feats, _placeholder_index(is_image, feats.shape[1])), x)

    def decode(self, input_ids, features: Features | None, mask: jax.Array, positions: jax.Array, cache=None):
        """The decoder over `embed`'s output (see `TextDecoder.__call__` for mask, positions and cache),
        with the features' DeepStack levels added after the first layers at the placeholders."""
        after_layer = None
        if features is not None and features.deepstack is not None:
            is_image = input_ids == self.config.image_token_id
            levels = features.deepstack.shape[1]
            index = _placeholder_index(is_image, features.deepstack.shape[2])  # once, not per layer

            def after_layer(i, x):  # layer i < levels adds level i (one program for every layer when scanned)
                if isinstance(i, int) and i >= levels:
                    return x
                level = jax.lax.dynamic_index_in_dim(features.deepstack, jnp.minimum(i, levels - 1), 1, False)
                level = sharding.shard_activation(level, ACT)
                add = is_image & (i < levels)
                return x + jnp.where(add[..., None], _splice(level.astype(x.dtype), index), 0)

        return self.language_model(self.embed(input_ids, features), mask, positions, cache, after_layer)

    def hidden_states(self, input_ids, features: Features | None, attention_mask=None, positions=None) -> jax.Array:
        """Final-norm hidden states float[B, T, D] (before the LM head) from `image_features`' output."""
        B, T = input_ids.shape
        if positions is None and features is not None and self.config.text.mrope_section:
            raise ValueError("rows with images need their 3D M-RoPE positions int32[B, 3, T] "
                             "(rdpo_jax.models.qwen2_5_vl.positions.rope_index)")
        if attention_mask is None:
            attention_mask = jnp.ones((B, T), jnp.int32)
        mask = attention_mask if attention_mask.ndim == 3 else layers.causal_mask(attention_mask)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        return self.decode(input_ids, features, mask.astype(bool), positions)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM head: float[..., D] -> float32[..., V]."""
        if self.config.tie_word_embeddings:
            out = self.language_model.embed_tokens.attend(hidden)
        else:
            out = self.lm_head(hidden)
        return out.astype(layers.wide(out.dtype))

    def head(self) -> jax.Array:
        """The LM head's weight float[D, V] in the compute dtype (the embedding table's transpose if tied)."""
        if self.config.tie_word_embeddings:
            w = self.language_model.embed_tokens.embedding[...].T
        else:
            w = self.lm_head.kernel[...]
        return w.astype(self.run.dtype)

    def target_logps(self, hidden: jax.Array, targets: jax.Array) -> jax.Array:
        """log p(target | hidden) float32[...] from hidden states float[..., D] and targets int[...], the
        head run over `run.vocab_chunk` columns at a time (`layers.target_logps`)."""
        return layers.target_logps(hidden.astype(self.run.dtype), self.head(), targets, self.run.vocab_chunk)

    def __call__(self, input_ids, images=None, attention_mask=None, positions=None) -> jax.Array:
        features = None if images is None else self.image_features(images)
        return self.logits(self.hidden_states(input_ids, features, attention_mask, positions))


def _placeholder_index(is_image: jax.Array, num_features: int) -> jax.Array:
    """int32[B, T]: at the n-th placeholder of a row, n (elsewhere a valid index of no meaning)."""
    return jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, num_features - 1)


def _splice(feats: jax.Array, index: jax.Array) -> jax.Array:
    """float[B, T, D]: each position's feature of float[B, F, D] by `_placeholder_index`."""
    return jnp.take_along_axis(feats, index[..., None], axis=1)


def _check_image_tokens(is_image: jax.Array, expected: jax.Array, enabled: bool):
    """Row b must hold exactly `expected[b]` placeholders: eagerly a ValueError, under jit a host callback
    (on four replicated scalars, so that sharded batches need no gather)."""
    if not enabled:
        return

    def check(num_bad, row, count, want):
        if num_bad:
            raise ImageTokenMismatchError(
                f"image placeholder tokens do not match image features: row {int(row)} has {int(count)} "
                f"placeholders, but its images give {int(want)} features ({int(num_bad)} bad rows of "
                f"{is_image.shape[0]})")

    counts = is_image.sum(axis=1)
    bad = counts != expected
    row = jnp.argmax(bad)
    stats = (bad.sum(), row, counts[row], expected[row])
    if isinstance(counts, jax.core.Tracer):
        jax.debug.callback(check, *stats)
    else:
        check(*stats)


@dataclasses.dataclass(frozen=True)
class Family:
    """What a family folder (`models/<family>/`) provides; `models/families.py` registers it.

    model_type: config.json's `model_type` it reads.
    architecture: the transformers class its checkpoints name (config.json's `architectures`; vLLM picks
      the model by it).
    config: the family's frozen architecture config type; from_hf: a transformers config -> one (an
      UnsupportedConfigError naming the field for what it does not implement).
    model: the `VisionLanguageModel` subclass, built as `model(config, run, rngs=…)`.
    image_input: `(config, processor dict | None, where, *, max_images, max_pixels, patch_buckets)` -> the
      host-side image adapter (`models/image_inputs.py` lists its protocol); `processor` None: the
      architecture's image shapes.
    hf_read: (pattern, replacement) regexes from every on-disk layout's tensor names to ours, in order,
      each applied at most once; hf_write: (our prefix, the Hub's prefix) for what we write (`models/hf.py`).
    tiny: the tiny models the tests, the smoke setup and the demo build: `VISION_TOKENS` (special tokens
      beyond "<image>"), `IMAGE_MARKUP` (the chat template's text for one image), `hf_config(tokenizer, *,
      width, depth, image_size, patch_size, tied, **text)`, `save_processor(folder, tokenizer, *,
      image_size, patch_size)`, `smoke_images(rng, png)`, and `smoke_config(c)` / `demo_config(c)`, the
      family's settings in `configs/smoke.py` / `configs/demo.py`.
    hf_skip, hf_experts: see the fields.
    """
    model_type: str
    architecture: str
    config: type
    from_hf: Callable[[Any], Any]
    model: type[VisionLanguageModel]
    image_input: Callable[..., Any]
    hf_read: tuple[tuple[str, str], ...]
    hf_write: tuple[tuple[str, str], ...]
    tiny: ModuleType
    hf_skip: str | None = None  # a regex of on-disk tensor names the model does not read (Qwen3.5's `mtp.*`)
    # the layout its Hub holds a MoE's stacked experts in, which we write: "in_out" [E, in, out] (Qwen3-VL-MoE)
    # or "out_in" [E, out, in] (Qwen3.5-MoE); every layout is read (`models/hf.py`)
    hf_experts: Literal["in_out", "out_in"] = "in_out"
