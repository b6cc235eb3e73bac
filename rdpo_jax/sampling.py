"""Generation with a KV cache under jit: one decode loop, run by the offline sampler and by the server.

A batch decodes as: `begin` (one prefill into a cache of T + new-token slots, then the decode state:
each row's settings, PRNG key, done flag, count) and `decode` (a `lax.while_loop` of up to `steps`
steps, each `pick` then `step`). The offline sampler (`generate`, `answer`: `data_prep.sample`,
`evaluate`, the Flax judge) runs one `decode` of max_new_tokens steps; the server (`serve/engine.py`)
runs it in chunks, reading each chunk's tokens on the host (streaming, stop strings, cancelled rows)
before the next. A served answer is thus the offline answer for the same prompt and settings.

Prompts are left-padded (int32[B, T] with a 1/0 mask) and their positions count real tokens only (as
transformers' `generate` does), so every row's last prompt token sits at index T−1 and all rows decode
in lockstep. Rows with different settings (`SamplingConfig`) share a batch: the decode state holds them
per row, and a compiled program specializes only on the batch's `Variant`. Each step (`pick`):
penalties, suppressed ids at −inf, then greedy rows (temperature 0) take the argmax and the others draw
after temperature, top-k, top-p (transformers' order).

Randomness is per row: row r draws its step-i token with fold_in(keys[r], i), so a row's samples depend
on its own key only, not on the other rows of the batch. `row_keys` derives the keys from a prompt's
index and the sample's number, which makes a prompt's samples independent of how prompts are batched
(a resumed `data_prep.sample` reproduces an uninterrupted run). Text-only batches pass no images.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rdpo_jax import sharding
from rdpo_jax.data.tokenize import Prompt


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How one prompt's answers are drawn; checked when made, hashable (a static argument of `generate`)."""
    max_new_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    presence_penalty: float = 0.0  # subtracted once from the logit of a token generated (OpenAI)
    frequency_penalty: float = 0.0  # subtracted per generated occurrence (OpenAI)
    repetition_penalty: float = 1.0  # divides a positive logit (multiplies a negative one) of a token in the
    # prompt or generated (vLLM); every penalty applies to the logits before temperature, top-k and top-p
    num_samples: int = 1  # answers per prompt
    ignore_eos: bool = False  # decode max_new_tokens tokens whatever the model emits (vLLM's)
    stop_ids: tuple[int, ...] = ()
    suppress_ids: tuple[int, ...] = ()  # never generated (e.g. the image placeholder; transformers has none)
    pad_id: int = 0

    def __post_init__(self):
        rules = {"max_new_tokens ≥ 1": self.max_new_tokens >= 1, "num_samples ≥ 1": self.num_samples >= 1,
                 "top_k ≥ 0": self.top_k >= 0, "temperature ≥ 0": 0 <= self.temperature < math.inf,
                 "top_p in (0, 1]": 0 < self.top_p <= 1,
                 "repetition_penalty > 0": 0 < self.repetition_penalty < math.inf,
                 "finite penalties": math.isfinite(self.presence_penalty) and math.isfinite(self.frequency_penalty)}
        broken = [rule for rule, holds in rules.items() if not holds]
        if broken:
            raise ValueError(f"{self}: expected {', '.join(broken)}")

    @property
    def penalized(self) -> bool:
        return (self.presence_penalty, self.frequency_penalty, self.repetition_penalty) != (0.0, 0.0, 1.0)


ROW_FLOATS = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty")


def row_settings(settings: Sequence[SamplingConfig]) -> dict[str, np.ndarray]:
    """The rows' settings as decode-state arrays: float32[R] each of `ROW_FLOATS`, max_tokens int32[R] and
    ignore_eos bool[R]."""
    out = {f: np.array([getattr(s, f) for s in settings], np.float32) for f in ROW_FLOATS}
    return {**out, "max_tokens": np.array([s.max_new_tokens for s in settings], np.int32),
            "ignore_eos": np.array([s.ignore_eos for s in settings], bool)}


@dataclasses.dataclass(frozen=True)
class Variant:
    """What a batch's decode program specializes on (a static argument): whether any row draws, top-k,
    whether any drawn row has a top-p (the sort), penalties, and the ids every row shares."""
    sample: bool
    top_k: int
    top_p: bool
    penalize: bool
    stop_ids: tuple[int, ...]
    suppress_ids: tuple[int, ...]
    pad_id: int

    @classmethod
    def of(cls, settings: Sequence[SamplingConfig]) -> Variant:
        """The variant of a batch's rows; ValueError for rows that cannot share one (drawn rows with different
        top-k, rows with different stop, suppressed or pad ids)."""
        drawn = [s for s in settings if s.temperature > 0]
        if len({s.top_k for s in drawn}) > 1 or len({(s.stop_ids, s.suppress_ids, s.pad_id) for s in settings}) > 1:
            raise ValueError("rows with different top_k, stop, suppressed or pad ids cannot share a batch")
        first = settings[0]
        return cls(sample=bool(drawn), top_k=drawn[0].top_k if drawn else 0, top_p=any(s.top_p < 1 for s in drawn),
                   penalize=any(s.penalized for s in settings), stop_ids=first.stop_ids,
                   suppress_ids=first.suppress_ids, pad_id=first.pad_id)


def filter_logits(logits: jax.Array, temperature, top_k: int = 0, top_p=None) -> jax.Array:
    """float32[R, V] logits divided by the temperature, then top-k, then top-p (filtered entries become
    -inf); `temperature` and `top_p` are float32[R, 1] (per row) or scalars; `top_p` None skips the top-p sort
    (every row keeps all tokens); a top-p of 1 keeps all tokens of its row."""
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


def penalize_logits(logits: jax.Array, s: dict) -> jax.Array:
    """float32[R, V] logits under each row's repetition penalty (on tokens of its prompt, `seen`, or generated,
    `counts`), then its frequency and presence penalties (on generated tokens); neutral settings leave a row's
    logits exact."""
    generated = s["counts"] > 0
    rep = s["repetition_penalty"][:, None]
    logits = jnp.where(s["seen"] | generated, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    return (logits - s["frequency_penalty"][:, None] * s["counts"]
            - s["presence_penalty"][:, None] * generated.astype(logits.dtype))


def pick(s: dict, variant: Variant) -> jax.Array:
    """Each row's next token int32[R] from the decode state's logits (see the module doc): greedy rows the
    argmax, drawn rows a draw with fold_in(keys[r], step)."""
    logits = penalize_logits(s["logits"], s) if variant.penalize else s["logits"]
    if variant.suppress_ids:
        logits = logits.at[:, jnp.asarray(variant.suppress_ids)].set(-jnp.inf)
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if variant.sample:
        t = jnp.maximum(s["temperature"], 1e-6)[:, None]  # greedy rows' draws are discarded
        filtered = filter_logits(logits, t, variant.top_k, s["top_p"][:, None] if variant.top_p else None)
        draw = jax.vmap(lambda key, row: jax.random.categorical(jax.random.fold_in(key, s["step"]), row))
        token = jnp.where(s["temperature"] > 0, draw(s["keys"], filtered).astype(jnp.int32), token)
    return token


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
    """Samples continuations: `begin`, then one `decode` of max_new_tokens steps.

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
    R, M = B * cfg.num_samples, cfg.max_new_tokens
    keys = key if key.ndim == 1 else jax.random.split(key, R)
    variant = Variant.of([cfg])
    state = begin(model, prompt_ids, prompt_mask, images, positions, T + M, row_settings([cfg] * R), keys,
                  repeat=cfg.num_samples, penalize=variant.penalize)
    state, tokens = decode(model, state, variant, steps=M, prompt_len=T)
    return tokens, state["count"]


def begin(model, prompt_ids: jax.Array, prompt_mask: jax.Array, images, positions: jax.Array | None, length: int,
          settings: dict, keys: jax.Array, *, live: jax.Array | None = None, repeat: int = 1,
          penalize: bool = False) -> dict:
    """The decode state of a batch: `prefill` of its prompts (see `generate`) into a cache of `length`
    slots, each prompt's state copied `repeat` times (rows b·n … b·n+n−1 of prompt b), with the rows'
    `settings` (`row_settings`), PRNG `keys` [R], done bool[R] (rows not `live` are done from the start),
    count int32[R] (tokens generated) and step; with `penalize`, also each row's prompt tokens (seen
    bool[R, V]) and generated-token counts (counts int32[R, V])."""
    state = prefill(model, prompt_ids, prompt_mask, images, positions, length)
    if penalize:
        B, V = state["logits"].shape
        ids = jnp.where(prompt_mask > 0, prompt_ids, V)  # padding: out of range, dropped
        state["seen"] = jnp.zeros((B, V), bool).at[jnp.arange(B)[:, None], ids].set(True, mode="drop")
    if repeat > 1:
        cache = model.language_model.repeat_cache(state.pop("cache"), repeat)
        state = {**jax.tree.map(lambda a: jnp.repeat(a, repeat, axis=0), state), "cache": cache}
    R = keys.shape[0]
    state.update(settings, keys=keys, done=jnp.zeros(R, bool) if live is None else ~live,
                 count=jnp.zeros(R, jnp.int32), step=jnp.int32(0))
    if penalize:
        state["counts"] = jnp.zeros((R, state["logits"].shape[1]), jnp.int32)
    return state


def decode(model, state: dict, variant: Variant, *, steps: int, prompt_len: int) -> tuple[dict, jax.Array]:
    """Up to `steps` decode steps (`pick`, then `step`) of every row not done; stops early when all are.

    Returns:
      (state, tokens int32[R, steps]): a row's tokens of this call are the first (new count − old count)
      entries of its row, the rest the pad id. A row is done after a stop id (unless it ignores them) or
      its max_tokens-th token.
    """
    R = state["done"].shape[0]
    stop = jnp.asarray(variant.stop_ids or (-1,), jnp.int32)

    def body(carry):
        j, out, s = carry
        token = jnp.where(s["done"], variant.pad_id, pick(s, variant))
        count = s["count"] + (~s["done"]).astype(jnp.int32)
        done = s["done"] | (jnp.isin(token, stop) & ~s["ignore_eos"]) | (count >= s["max_tokens"])
        if variant.penalize:
            s = {**s, "counts": s["counts"].at[jnp.arange(R), token].add((~s["done"]).astype(jnp.int32))}
        s = step(model, s, token, prompt_len + s["step"])
        return j + 1, out.at[:, j].set(token), {**s, "count": count, "done": done, "step": s["step"] + 1}

    def cond(carry):
        j, _, s = carry
        return (j < steps) & ~jnp.all(s["done"])

    init = (jnp.int32(0), jnp.full((R, steps), variant.pad_id, jnp.int32), state)
    _, tokens, state = jax.lax.while_loop(cond, body, init)
    return state, tokens


def prefill(model, prompt_ids: jax.Array, prompt_mask: jax.Array, images, positions: jax.Array | None,
            length: int) -> dict:
    """Left-padded prompts (see `generate`) through the decoder into a KV cache of `length` slots: the
    decode state {cache, logits float32[B, V] after each prompt, valid bool[B, length] (filled slots),
    position int32[B] (each prompt's largest position)}."""
    B, T = prompt_ids.shape
    lm = model.language_model
    if positions is None:
        positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0).astype(jnp.int32)
    features = None if images is None else model.image_features(images)
    valid = jnp.concatenate([prompt_mask > 0, jnp.zeros((B, length - T), bool)], axis=1)
    mask = jnp.tril(jnp.ones((T, length), bool), 0)[None] & valid[:, None, :]
    hidden, cache = model.decode(prompt_ids, features, mask, positions, (lm.init_cache(B, length, model.run.dtype), 0))
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


# ----- host side: prompts to arrays, arrays to devices, tokens to text -----

def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, length: int | None = None):
    """Token lists → (ids int32[B, T], mask int32[B, T]) left-padded to `length` (default: the longest)."""
    T = length or max(map(len, prompts))
    ids = np.full((len(prompts), T), pad_id, np.int32)
    mask = np.zeros((len(prompts), T), np.int32)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = p
        mask[i, T - len(p):] = 1
    return ids, mask


def collate(policy, prompts: Sequence[Prompt], length: int):
    """Host arrays of encoded prompts (`ChatTokenizer.encode`) for `begin`, rows not yet padded to the
    devices: (ids int32[B, length], mask int32[B, length], image arrays, with "positions" int32[B, 3,
    length] for M-RoPE). Prompts may hold different numbers of images (LLaVA encodes the batch's largest
    count per row; `batches_by_image_count` groups prompts to avoid that)."""
    vision = policy.image_input
    ids, mask = left_pad([p.ids for p in prompts], policy.tokenizer.pad_id, length)
    arrays, _ = vision.collate([p.images for p in prompts],
                               slots=max(len(p.images["tokens"]) if p.images else 0 for p in prompts))
    if vision.mrope:  # the prompts' 3D positions, left-padded like the tokens
        arrays["positions"] = np.zeros((len(prompts), 3, length), np.int32)
        for b, p in enumerate(prompts):
            arrays["positions"][b, :, length - len(p.ids):] = p.positions
    return ids, mask, arrays


def to_devices(mesh, rows: int, *arrays):
    """Host arrays (pytrees of equal leading size) padded to `rows` rows rounded up to a multiple of the
    mesh's devices (padding rows repeat the last row) and split over the batch axes (`sharding.BATCH_AXES`)."""
    total = rows + -rows % mesh.devices.size
    arrays = jax.tree.map(lambda x: np.concatenate([x, np.repeat(x[-1:], total - len(x), 0)]), arrays)
    return jax.device_put(arrays, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.BATCH_AXES)))


def answer(policy, prompts: list[dict], cfg: SamplingConfig, keys: jax.Array, *,
           pad_to: int = 64) -> list[list[tuple[str, list[int], bool]]]:
    """Generates `cfg.num_samples` answers for each prompt record ({messages, images}) with a loaded
    model (`inference.Policy`: its model, tokenizer and image adapter, on its mesh): prompts left-padded
    to the longest rounded up to a multiple of `pad_to` (few shapes compile), rows padded to whole
    batches over the devices and split over them.

    Args:
      keys: per-row PRNG keys [len(prompts)·n] (`row_keys`), or one key (see `generate`).

    Returns:
      Per prompt, per sample: (decoded text, generated ids up to and including the stop token when it
      stopped, whether it stopped).
    """
    encoded = [policy.tokenizer.encode(r["messages"], r["images"], policy.image_input) for r in prompts]
    length = -(-max(len(p.ids) for p in encoded) // pad_to) * pad_to
    ids, mask, arrays = collate(policy, encoded, length)
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
            stopped = bool(generated) and generated[-1] in cfg.stop_ids and not cfg.ignore_eos
            row_answers.append((policy.tokenizer.decode(generated).strip(), generated, stopped))
        out.append(row_answers)
    return out
