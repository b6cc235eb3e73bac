"""Batched generation with a KV cache under jit: one prefill, then a `lax.while_loop` of decode steps.

Prompts are left-padded (int32[B, T] with a 1/0 mask), positions count real tokens only (as
transformers' `generate` does), so every row's last prompt token sits at index T−1 and all rows decode
in lockstep into one cache of T + max_new_tokens slots. Each prompt is prefilled once and its cache
copied for its `n` samples. Sampling: temperature, then top-k, then top-p (transformers' order);
temperature 0 is greedy. A row stops after any of `stop_ids`; later slots hold `pad_id`; `suppress_ids`
are never generated.

Randomness is per row: row r draws its step-i token with fold_in(keys[r], i), so a row's samples depend
on its own key only, not on the other rows of the batch. `row_keys` derives the keys from a prompt's
index and the sample's number, which makes a prompt's samples independent of how prompts are batched
(a resumed `rdpo_jax.data_prep.sample` reproduces an uninterrupted run). Text-only batches pass no images.
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
    suppress_ids: tuple[int, ...] = ()  # never generated (e.g. the image placeholder; transformers has none)


def filter_logits(logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Temperature, top-k and top-p applied to float32[B, V] logits (filtered entries become -inf)."""
    return filter_rows(logits, cfg.temperature, cfg.top_k, cfg.top_p if cfg.top_p < 1.0 else None)


def filter_rows(logits: jax.Array, temperature, top_k: int = 0, top_p=None) -> jax.Array:
    """`filter_logits` with a temperature and a top-p per row (float32[B, 1], or scalars); `top_p` None
    skips the top-p sort (every row keeps all tokens); a top-p of 1 keeps all tokens of its row."""
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        drop_sorted = (jnp.cumsum(probs, axis=-1) - probs >= top_p) & (top_p < 1.0)  # keep the first token
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return logits


def _pick(logits: jax.Array, keys: jax.Array, step: jax.Array, cfg: SamplingConfig) -> jax.Array:
    if cfg.suppress_ids:
        logits = logits.at[:, jnp.asarray(cfg.suppress_ids)].set(-jnp.inf)
    if cfg.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    draw = lambda key, row: jax.random.categorical(jax.random.fold_in(key, step), row)  # noqa: E731
    return jax.vmap(draw)(keys, filter_logits(logits, cfg)).astype(jnp.int32)


def row_keys(key: jax.Array, prompt_indices, num_samples: int) -> jax.Array:
    """Per-row keys for `generate`: row b·n + j gets fold_in(fold_in(key, prompt_indices[b]), j).

    Args:
      key: the base PRNG key (e.g. `jax.random.key(seed)`).
      prompt_indices: one stable integer per prompt of the batch (its index in the pool).
      num_samples: samples per prompt (n).

    Returns:
      A PRNG key array [len(prompt_indices)·n].
    """
    per_prompt = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(list(prompt_indices), jnp.int32))
    per_row = jax.vmap(lambda k: jax.vmap(lambda j: jax.random.fold_in(k, j))(jnp.arange(num_samples)))(per_prompt)
    return per_row.reshape(-1)


def batches_by_image_count(image_counts: list[int], batch_size: int) -> list[list[int]]:
    """Positions 0…len−1 in batches of at most `batch_size`, each of one image count (LLaVA then
    encodes no blank images): per count, in increasing order, consecutive runs of the positions with it.
    A function of `image_counts` only, so a rerun forms the same batches."""
    by_count: dict[int, list[int]] = {}
    for position, count in enumerate(image_counts):
        by_count.setdefault(count, []).append(position)
    return [group[i:i + batch_size] for _, group in sorted(by_count.items())
            for i in range(0, len(group), batch_size)]


@nnx.jit(static_argnames="cfg")
def generate(model, prompt_ids: jax.Array, prompt_mask: jax.Array, images, key: jax.Array, cfg: SamplingConfig,
             positions: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Samples continuations.

    Args:
      model: a vision-language model (`models/vlm.py`).
      prompt_ids, prompt_mask: int32[B, T], left-padded.
      images: the family's image input for the prompts (LLaVA: float32[B, N, H, W, 3]), or None.
      key: per-row PRNG keys [B·n] (see `row_keys`; row r draws step i with fold_in(key[r], i)), or one
        key, split into B·n row keys.
      cfg: decoding settings (static).
      positions: the prompts' positions, int32[B, T] or int32[B, 3, T] (M-RoPE: required with images);
        default 0, 1, … over the tokens. Generated token i sits at the prompt's largest position + 1 + i
        (on all three rows: transformers' `rope_deltas`).

    Returns:
      (tokens int32[B·n, max_new_tokens], lengths int32[B·n]); rows b·n … b·n+n−1 belong to prompt b; a
      length counts tokens up to and including the stop token.
    """
    B, T = prompt_ids.shape
    n, M = cfg.num_samples, cfg.max_new_tokens
    state = prefill(model, prompt_ids, prompt_mask, images, positions, T + M)
    cache = model.language_model.repeat_cache(state.pop("cache"), n)  # each prompt's state copied n times
    state = {**jax.tree.map(lambda a: jnp.repeat(a, n, axis=0), state), "cache": cache}
    rows = B * n
    keys = key if key.ndim == 1 else jax.random.split(key, rows)
    stop = jnp.asarray(cfg.stop_ids or (-1,), jnp.int32)

    def body(carry):
        i, tokens, done, state = carry
        token = _pick(state["logits"], keys, i, cfg)
        token = jnp.where(done, cfg.pad_id, token)
        tokens = tokens.at[:, i].set(token)
        done = done | jnp.isin(token, stop)
        return i + 1, tokens, done, step(model, state, token, T + i)

    def cond(carry):
        i, _, done, *_ = carry
        return (i < M) & ~jnp.all(done)

    init = (jnp.int32(0), jnp.full((rows, M), cfg.pad_id, jnp.int32), jnp.zeros(rows, bool), state)
    _, tokens, done, _ = jax.lax.while_loop(cond, body, init)
    is_stop = jnp.isin(tokens, stop)
    first_stop = jnp.argmax(is_stop, axis=1)
    lengths = jnp.where(is_stop.any(axis=1), first_stop + 1, M).astype(jnp.int32)
    return tokens, lengths


def prefill(model, prompt_ids: jax.Array, prompt_mask: jax.Array, images, positions: jax.Array | None,
            length: int) -> dict:
    """Left-padded prompts (see `generate`) through the decoder into a KV cache of `length` slots: the
    decode state {cache, logits float32[B, V] after each prompt, valid bool[B, length] (filled slots),
    position int32[B] (each prompt's largest position)}."""
    B, T = prompt_ids.shape
    lm = model.language_model
    if positions is None:
        positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0).astype(jnp.int32)
    x = model.embed(prompt_ids, None if images is None else model.image_features(images))
    valid = jnp.concatenate([prompt_mask > 0, jnp.zeros((B, length - T), bool)], axis=1)
    mask = jnp.tril(jnp.ones((T, length), bool), 0)[None] & valid[:, None, :]
    hidden, cache = lm(x, mask, positions, (lm.init_cache(B, length, x.dtype), 0))
    return {"cache": cache, "logits": model.logits(hidden[:, -1]), "valid": valid,
            "position": positions.reshape(B, -1).max(axis=1)}


def step(model, state: dict, token: jax.Array, slot) -> dict:
    """One decode step: each row's `token` int32[R] written at cache `slot` (one past the last filled
    one) at the row's next position; returns the state with the next logits."""
    lm = model.language_model
    valid = state["valid"].at[:, slot].set(True)
    position = state["position"] + 1
    h, cache = lm(lm.embed_tokens(token[:, None]), valid[:, None, :], position[:, None], (state["cache"], slot))
    return {**state, "cache": cache, "logits": model.logits(h[:, 0]), "valid": valid, "position": position}


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


def encode_prompts(policy, prompts: list[dict], *, pad_to: int = 64):
    """Host arrays of prompt records ({messages, images}) for `generate`, rows not yet padded to the
    devices: (ids int32[B, T], mask int32[B, T], image arrays (with "positions" int32[B, 3, T] for
    M-RoPE)); T is the longest prompt rounded up to a multiple of `pad_to` (few shapes compile). Prompts
    may hold different numbers of images (LLaVA encodes the batch's largest count per row;
    `batches_by_image_count` groups prompts to avoid that)."""
    vision = policy.image_input
    prepared = [vision.prepare(r["images"]) for r in prompts]
    prompt_ids = [policy.tokenizer.prompt(r["messages"], p["tokens"] if p else []) for r, p in zip(prompts, prepared)]
    return collate_prompts(policy, prompt_ids, prepared, pad_to=pad_to)


def collate_prompts(policy, prompt_ids: list[list[int]], prepared: list, *, pad_to: int = 64):
    """`encode_prompts` from tokenized prompts and their prepared images (`image_input.prepare`)."""
    import numpy as np

    vision = policy.image_input
    length = -(-max(map(len, prompt_ids)) // pad_to) * pad_to
    ids, mask = left_pad(prompt_ids, policy.tokenizer.pad_id, length)
    arrays, _ = vision.collate(prepared, slots=max(len(p["tokens"]) if p else 0 for p in prepared))
    if vision.mrope:  # the prompts' 3D positions, left-padded like the tokens
        arrays["positions"] = np.zeros((len(prompt_ids), 3, length), np.int32)
        for b, (p, prep) in enumerate(zip(prompt_ids, prepared)):
            arrays["positions"][b, :, length - len(p):] = vision.positions(np.asarray(p), prep)
    return ids, mask, arrays


def to_devices(mesh, rows: int, *arrays):
    """Host arrays (pytrees of equal leading size) padded to `rows` rows rounded up to a multiple of the
    mesh's devices (padding rows repeat the last row) and split over data × fsdp."""
    import numpy as np

    total = rows + -rows % mesh.devices.size
    arrays = jax.tree.map(lambda x: np.concatenate([x, np.repeat(x[-1:], total - len(x), 0)]), arrays)
    return jax.device_put(arrays, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"))))


def answer(policy, prompts: list[dict], cfg: SamplingConfig, keys: jax.Array, *,
           pad_to: int = 64) -> list[list[tuple[str, list[int], bool]]]:
    """Generates `cfg.num_samples` answers for each prompt record ({messages, images}) with a loaded
    model (`inference.Policy`: its model, tokenizer and image adapter, on its mesh); prompts as
    `encode_prompts` batches them, rows padded to whole batches over the devices and split over them.

    Args:
      keys: per-row PRNG keys [len(prompts)·n] (`row_keys`), or one key (see `generate`).

    Returns:
      Per prompt, per sample: (decoded text, generated ids up to and including the stop token when it
      stopped, whether it stopped).
    """
    import numpy as np

    ids, mask, arrays = encode_prompts(policy, prompts, pad_to=pad_to)
    extra = -len(prompts) % policy.mesh.devices.size
    if keys.ndim == 1:  # padding rows repeat the last prompt's keys
        keys = jnp.concatenate([keys, jnp.tile(keys[-cfg.num_samples:], extra)])
    ids, mask, arrays = to_devices(policy.mesh, len(prompts), ids, mask, arrays)
    positions = arrays.pop("positions", None)
    tokens, lengths = generate(policy.model, ids, mask, policy.model.images_of(arrays), keys, cfg, positions)
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    out = []
    for b in range(len(prompts)):
        row_answers = []
        for j in range(cfg.num_samples):
            row = b * cfg.num_samples + j
            generated = tokens[row, :int(lengths[row])].tolist()
            text = policy.tokenizer.tokenizer.decode(generated, skip_special_tokens=True).strip()
            row_answers.append((text, generated, bool(generated) and generated[-1] in cfg.stop_ids))
        out.append(row_answers)
    return out
