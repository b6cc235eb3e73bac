"""The LLaVA composition: vision tower → MLP projector → image features spliced into the text sequence.

Matches transformers' `LlavaForConditionalGeneration`. The attribute tree mirrors transformers' module
names so that `models/hf.py` maps weights by renaming leaves only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rdpo_jax import sharding
from rdpo_jax.models import layers
from rdpo_jax.models.config import LlavaConfig, RunSettings
from rdpo_jax.models.layers import Linear
from rdpo_jax.models.text import TextDecoder
from rdpo_jax.models.vision import VisionTower


ACT = ("batch", "seq", "act_embed")


class ImageTokenMismatchError(ValueError):
    """The image placeholders of a row do not match the image features given for it."""


class Projector(nnx.Module):
    """LLaVA's 2-layer MLP from (concatenated) vision features to the text width."""

    def __init__(self, cfg: LlavaConfig, run: RunSettings, *, rngs: layers.InitKeys):
        d = cfg.text.hidden_size
        kw = dict(bias=cfg.projector_bias, param_dtype=run.param_dtype, dtype=run.dtype, rngs=rngs)
        self.linear_1 = Linear(cfg.projector_in, d, ("embed", "mlp"), **kw)
        self.linear_2 = Linear(d, d, ("mlp", "embed"), **kw)
        self.act = layers.activation(cfg.projector_hidden_act)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(self.act(self.linear_1(x)))


class Llava(nnx.Module):
    """Call: `model(input_ids, pixel_values, attention_mask=None, positions=None) -> logits float32[B, T, V]`.

    Args (of `__call__`):
      input_ids: int32[B, T]; `config.image_token_id` marks the image placeholders.
      pixel_values: float32[B, H, W, 3] or float32[B, N, H, W, 3] (N images per row, filling the row's
        placeholders in order), NHWC and normalized as the HF image processor does; or None (text only).
      attention_mask: int32[B, T] padding mask (1 = token), giving a causal + padding mask; or an
        explicit bool[B, T, T] mask (True = query t may attend key s) for packed layouts; None = causal.
      positions: int32[B, T] RoPE positions; default 0..T-1 for every row (as transformers' forward).
    """

    def __init__(self, cfg: LlavaConfig, run: RunSettings = RunSettings(), *, rngs: layers.InitKeys):
        self.vision_tower = VisionTower(cfg.vision, param_dtype=run.param_dtype, dtype=run.dtype,
                                        remat=run.remat, rngs=rngs)
        self.multi_modal_projector = Projector(cfg, run, rngs=rngs)
        self.language_model = TextDecoder(cfg.text, param_dtype=run.param_dtype, dtype=run.dtype,
                                          remat=run.remat, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.text.hidden_size, cfg.text.vocab_size, ("embed", "vocab"), bias=False,
                                  param_dtype=run.param_dtype, dtype=run.dtype, rngs=rngs)
        self.config, self.run = cfg, run

    # ----- pieces, for callers that need hidden states (log-prob gathers, sampling) -----

    def image_features(self, pixel_values: jax.Array) -> jax.Array:
        """float[B, N, H, W, C] -> projected features float[B, N·F, D] (F = `config.image_seq_len`)."""
        cfg = self.config
        B, N = pixel_values.shape[:2]
        hidden = self.vision_tower(pixel_values.reshape(B * N, *pixel_values.shape[2:]), cfg.feature_layers)
        if cfg.vision_feature_select_strategy == "default":
            hidden = [h[:, 1:] for h in hidden]
        feats = self.multi_modal_projector(jnp.concatenate(hidden, axis=-1))
        return feats.reshape(B, N * feats.shape[1], feats.shape[2])

    def embed(self, input_ids: jax.Array, pixel_values: jax.Array | None) -> jax.Array:
        """Token embeddings with image features written over the placeholders: float[B, T, D]."""
        cfg = self.config
        x = sharding.shard_activation(self.language_model.embed_tokens(input_ids), ACT)
        is_image = input_ids == cfg.image_token_id
        if pixel_values is None:
            _check_image_tokens(is_image, 0, self.run.check_image_tokens)
            return x
        if pixel_values.ndim == 4:
            pixel_values = pixel_values[:, None]
        feats = sharding.shard_activation(self.image_features(pixel_values).astype(x.dtype), ACT)
        _check_image_tokens(is_image, feats.shape[1], self.run.check_image_tokens)
        index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, feats.shape[1] - 1)
        spliced = jnp.take_along_axis(feats, index[..., None], axis=1)
        return jnp.where(is_image[..., None], spliced, x)

    def hidden_states(self, input_ids, pixel_values, attention_mask=None, positions=None) -> jax.Array:
        """Final-norm hidden states float[B, T, D] (before the LM head)."""
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((B, T), jnp.int32)
        mask = attention_mask if attention_mask.ndim == 3 else layers.causal_mask(attention_mask)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        return self.language_model(self.embed(input_ids, pixel_values), mask.astype(bool), positions)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM head: float[..., D] -> float32[..., V]."""
        if self.config.tie_word_embeddings:
            out = self.language_model.embed_tokens.attend(hidden)
        else:
            out = self.lm_head(hidden)
        return out.astype(layers.wide(out.dtype))

    def __call__(self, input_ids, pixel_values=None, attention_mask=None, positions=None) -> jax.Array:
        return self.logits(self.hidden_states(input_ids, pixel_values, attention_mask, positions))


def _check_image_tokens(is_image: jax.Array, expected: int, enabled: bool):
    """Every row must hold exactly `expected` placeholders: eagerly a ValueError, under jit a host callback
    (on three replicated scalars, so that sharded batches need no gather)."""
    if not enabled:
        return

    def check(num_bad, row, count):
        if num_bad:
            raise ImageTokenMismatchError(
                f"image placeholder tokens do not match image features: row {int(row)} has {int(count)} "
                f"placeholders, but its images give {expected} features ({int(num_bad)} bad rows of "
                f"{is_image.shape[0]})")

    counts = is_image.sum(axis=1)
    bad = counts != expected
    row = jnp.argmax(bad)
    stats = (bad.sum(), row, counts[row])
    if isinstance(counts, jax.core.Tracer):
        jax.debug.callback(check, *stats)
    else:
        check(*stats)


# ----- construction -----

def abstract_model(cfg: LlavaConfig, run: RunSettings = RunSettings()) -> Llava:
    """The model with ShapeDtypeStruct leaves: shapes, dtypes and logical axes, no memory."""
    return nnx.eval_shape(lambda: Llava(cfg, run, rngs=layers.InitKeys(jax.random.key(0))))


def create(cfg: LlavaConfig, run: RunSettings = RunSettings(), *, mesh: jax.sharding.Mesh | None = None,
           seed: int = 0) -> Llava:
    """A freshly initialized model whose parameters are born sharded on `mesh` (never whole on one host)."""
    graphdef, abstract_state = nnx.split(abstract_model(cfg, run))
    shardings = sharding.state_shardings(abstract_state, mesh)

    init = jax.jit(lambda key: nnx.state(Llava(cfg, run, rngs=layers.InitKeys(key))), out_shardings=shardings)
    return nnx.merge(graphdef, init(jax.random.key(seed)))
