"""Batched generation with a KV cache under jit: one prefill, then a `lax.while_loop` of decode steps.

Prompts are left-padded (int32[B, T] with a 1/0 mask), positions count real tokens only (as
transformers' `generate` does), so every row's last prompt token sits at index T−1 and all rows decode
in lockstep into one cache of T + max_new_tokens slots. Each prompt is prefilled once and its cache
copied for its `n` samples. Sampling: temperature, then top-k, then top-p (transformers' order);
temperature 0 is greedy. A row stops after any of `stop_ids`; later slots hold `pad_id`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    stop_ids: tuple[int, ...] = ()
    pad_id: int = 0
    num_samples: int = 1  # samples per prompt


def filter_logits(logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Temperature, top-k and top-p applied to float32[B, V] logits (filtered entries become -inf)."""
    logits = logits / cfg.temperature
    if cfg.top_k:
        kth = jax.lax.top_k(logits, cfg.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if cfg.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        drop_sorted = cumulative - jax.nn.softmax(sorted_logits, axis=-1) >= cfg.top_p  # keep the first token
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return logits


def _pick(logits: jax.Array, key: jax.Array, cfg: SamplingConfig) -> jax.Array:
    if cfg.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, cfg), axis=-1).astype(jnp.int32)


@nnx.jit(static_argnames="cfg")
def generate(model, prompt_ids: jax.Array, prompt_mask: jax.Array, pixel_values: jax.Array | None,
             key: jax.Array, cfg: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    """Samples continuations.

    Args:
      model: a `Llava`.
      prompt_ids, prompt_mask: int32[B, T], left-padded.
      pixel_values: float32[B, N, H, W, 3] (or [B, H, W, 3]) or None.
      key: PRNG key (row r, step i use fold_in(fold_in(key, i), …) through `categorical`).
      cfg: decoding settings (static).

    Returns:
      (tokens int32[B·n, max_new_tokens], lengths int32[B·n]); rows b·n … b·n+n−1 belong to prompt b; a
      length counts tokens up to and including the stop token.
    """
    B, T = prompt_ids.shape
    n, M = cfg.num_samples, cfg.max_new_tokens
    lm = model.language_model
    S = T + M
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0).astype(jnp.int32)
    x = model.embed(prompt_ids, pixel_values)
    valid = jnp.concatenate([prompt_mask > 0, jnp.zeros((B, M), bool)], axis=1)  # [B, S]
    mask = jnp.tril(jnp.ones((T, S), bool), 0)[None] & valid[:, None, :]
    hidden, cache = lm(x, mask, positions, (lm.init_cache(B, S, x.dtype), 0))
    logits = model.logits(hidden[:, -1])

    def repeat(a):
        return jnp.repeat(a, n, axis=0)

    cache = jax.tree.map(repeat, cache)
    logits, valid, position = repeat(logits), repeat(valid), repeat(positions[:, -1])
    rows = B * n
    stop = jnp.asarray(cfg.stop_ids or (-1,), jnp.int32)

    def body(carry):
        i, tokens, done, cache, logits, valid, position = carry
        token = _pick(logits, jax.random.fold_in(key, i), cfg)
        token = jnp.where(done, cfg.pad_id, token)
        tokens = tokens.at[:, i].set(token)
        done = done | jnp.isin(token, stop)
        valid = valid.at[:, T + i].set(True)
        position = position + 1
        h, cache = lm(lm.embed_tokens(token[:, None]), valid[:, None, :], position[:, None], (cache, T + i))
        return i + 1, tokens, done, cache, model.logits(h[:, 0]), valid, position

    def cond(carry):
        i, _, done, *_ = carry
        return (i < M) & ~jnp.all(done)

    init = (jnp.int32(0), jnp.full((rows, M), cfg.pad_id, jnp.int32), jnp.zeros(rows, bool), cache, logits, valid,
            position)
    _, tokens, done, *_ = jax.lax.while_loop(cond, body, init)
    is_stop = jnp.isin(tokens, stop)
    first_stop = jnp.argmax(is_stop, axis=1)
    lengths = jnp.where(is_stop.any(axis=1), first_stop + 1, M).astype(jnp.int32)
    return tokens, lengths


def left_pad(prompts: list[list[int]], pad_id: int, length: int | None = None):
    """Token lists → (ids int32[B, T], mask int32[B, T]) left-padded to `length` (default: the longest)."""
    import numpy as np

    T = length or max(map(len, prompts))
    ids = np.full((len(prompts), T), pad_id, np.int32)
    mask = np.zeros((len(prompts), T), np.int32)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = p
        mask[i, T - len(p):] = 1
    return ids, mask


def answer(model, tokenizer, image_cfg, mesh, prompts: list[dict], cfg: SamplingConfig, key: jax.Array, *,
           pad_to: int = 64) -> list[list[tuple[str, int, bool]]]:
    """Generates `cfg.num_samples` answers for each prompt record ({messages, images}) on `mesh`: prompts
    left-padded to a multiple of `pad_to` (few shapes compile), rows padded to whole batches over the
    devices and split over them. Returns per prompt [(decoded text, tokens, stopped)]."""
    import numpy as np

    from rdpo_jax.data import images

    ids = [tokenizer.prompt(r["messages"], len(r["images"])) for r in prompts]
    length = -(-max(map(len, ids)) // pad_to) * pad_to
    ids, mask = left_pad(ids, tokenizer.pad_id, length)
    pixels = np.stack([np.stack([images.load_and_preprocess(b, image_cfg) for b in r["images"]]) for r in prompts])
    extra = -len(prompts) % mesh.devices.size
    ids, mask, pixels = (np.concatenate([x, np.repeat(x[-1:], extra, 0)]) for x in (ids, mask, pixels))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    ids, mask, pixels = jax.device_put((ids, mask, pixels), rows)
    tokens, lengths = generate(model, ids, mask, pixels, key, cfg)
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    out = []
    for b in range(len(prompts)):
        row_answers = []
        for j in range(cfg.num_samples):
            row = b * cfg.num_samples + j
            n = int(lengths[row])
            text = tokenizer.tokenizer.decode(tokens[row, :n], skip_special_tokens=True).strip()
            row_answers.append((text, n, n < cfg.max_new_tokens or int(tokens[row, n - 1]) in cfg.stop_ids))
        out.append(row_answers)
    return out
