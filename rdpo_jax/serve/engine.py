"""The serving engine: requests gathered into batches and decoded together with a KV cache.

One thread owns the model. It waits for a request, gathers the others that arrive within `wait_s`, or
while requests are still being parsed (up to 50 ms), up to `max_batch` rows (a request asking for n
choices is n rows), and decodes them as one batch. Prefill is one jitted call; decoding runs jitted
chunks of `chunk` steps (a `while_loop` that also stops when every row is done), and between chunks the
host streams each row's new text, applies stop strings and drops cancelled rows. Per row: temperature
(0 = greedy), top-p, presence/frequency/repetition penalties, max_tokens and a PRNG key (row j of a
request with a seed draws step i with fold_in(fold_in(key(seed), j), i)), so rows of different requests
share a batch.

Shapes: rows pad to a power of two (and to the mesh's devices), prompts (left-padded) to `pad_to` times
a power of two, new tokens to a power of two from 16; so the programs one server can compile are at
most rows buckets × prompt buckets × new-token buckets (`shape_bound`, per image layout and sampling
variant), however odd the requests. `warm_up` compiles the common ones before the first request.

A request whose preparation fails (its arrays, its keys, the prefill) is retried alone, so it fails
alone; a failure while decoding fails the requests still decoding in that batch.

Prefill and each step are `sampling.prefill` and `sampling.step`, what `sampling.generate` runs, and
greedy rows take the argmax of their logits, so a served greedy answer is `data_prep.sample`'s answer
for the same prompt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import queue
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rdpo_jax import sampling


ARRIVING_WAIT_S = 0.05  # the longest a batch waits for requests still being parsed
LEAST_NEW_TOKENS = 16  # the smallest new-token bucket


class QueueFull(RuntimeError):
    """More rows are waiting than the queue holds."""


@dataclasses.dataclass(eq=False)
class Request:
    """One chat completion: a tokenized prompt, its prepared images and the sampling settings.

    `emit(event)` is called from the engine thread with ("delta", choice, text) while a choice is
    generated (with `stream`; else one delta at its end), ("done", choice, finish_reason,
    completion_tokens) when it ends, or ("error", message)."""
    prompt: list[int]
    images: dict | None
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    # OpenAI's penalties subtract from a token's logit per generated occurrence (frequency) and once if it
    # was generated (presence); vLLM's repetition_penalty divides a positive logit (multiplies a negative
    # one) of every token in the prompt or generated. Applied to the logits before temperature and top-p.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # decode max_tokens tokens whatever the model emits (vLLM's extension)
    stream: bool = False  # text is emitted as it comes (else once, when the choice ends)
    emit: Callable = print
    cancelled: bool = False

    @property
    def penalized(self) -> bool:
        return (self.presence_penalty, self.frequency_penalty, self.repetition_penalty) != (0.0, 0.0, 1.0)


@dataclasses.dataclass(eq=False)
class _Row:
    request: Request
    choice: int
    tokens: list = dataclasses.field(default_factory=list)
    sent: int = 0  # characters of text streamed so far
    finished: bool = False


def _bucket(n: int, least: int = 1) -> int:
    return max(least, 1 << (max(n, 1) - 1).bit_length())


class Engine:
    """Batches and decodes `Request`s for a loaded `inference.Policy` in its own thread (`start`).

    `max_model_len` (prompt + new tokens at most, what the API enforces) only sizes `shape_bound`."""

    def __init__(self, policy, *, max_batch: int = 32, wait_s: float = 0.005, max_queue: int = 256,
                 pad_to: int = 64, chunk: int = 16, max_model_len: int | None = None,
                 lock: threading.Lock | None = None):
        self.policy, self.max_batch, self.wait_s, self.max_queue = policy, max_batch, wait_s, max_queue
        self.pad_to, self.chunk = pad_to, chunk
        self.lock = lock or threading.Lock()  # the tokenizer is shared with the request handlers
        self.stop_ids = policy.tokenizer.stop_ids()
        self.pad_id = policy.tokenizer.pad_id
        self.suppress = (policy.config.image_token_id,)
        self._rows = {self._rows_bucket(n): n for n in range(max_batch, 0, -1)}  # rows bucket → fewest rows in it
        self.shape_bound = None
        if max_model_len:
            longest = max(max_model_len - 1, 1)  # a prompt, or max_tokens, leaves at least one token
            prompt_buckets = _bucket(-(-longest // pad_to)).bit_length()
            new_token_buckets = (_bucket(longest, LEAST_NEW_TOKENS) // LEAST_NEW_TOKENS).bit_length()
            self.shape_bound = len(self._rows) * prompt_buckets * new_token_buckets
        self._queue: queue.Queue = queue.Queue()
        self._waiting = 0  # rows submitted and not yet taken into a batch
        self.arriving = 0  # requests being parsed (see `arrival`)
        self._count = threading.Lock()
        self._thread = None
        self._entropy = int.from_bytes(os.urandom(4), "little")
        self._draws = 0
        self._shapes: set = set()
        # running: rows of the batch decoding; cancelled: rows dropped for clients that went away;
        # shapes: distinct (rows, prompt, new tokens, images, sampling variant) programs run so far
        self.stats = {"batches": 0, "rows": 0, "tokens": 0, "running": 0, "cancelled": 0, "shapes": 0}
        graphdef, state = nnx.split(policy.model)
        self._prefill = jax.jit(functools.partial(_prefill, graphdef), static_argnames=("length", "penalize"))
        self._decode = jax.jit(functools.partial(_decode, graphdef), donate_argnums=(1,),
                               static_argnames=("steps", "prompt_len", "sample", "top_p", "penalize", "stop_ids",
                                                "suppress", "pad_id"))
        self._state = state

    # ----- the request side (any thread) -----

    @contextlib.contextmanager
    def arrival(self):
        """Wraps the parsing of a request (before `submit`): batches being gathered wait for it."""
        with self._count:
            self.arriving += 1
        try:
            yield
        finally:
            with self._count:
                self.arriving -= 1

    def submit(self, request: Request) -> None:
        with self._count:
            if self._waiting + request.n > self.max_queue:
                raise QueueFull(f"{self._waiting} rows are waiting (the queue holds {self.max_queue})")
            self._waiting += request.n
        self._queue.put(request)

    @property
    def waiting(self) -> int:
        """Rows submitted and not yet in a batch."""
        return self._waiting

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Finishes every submitted request, then stops the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()

    def warm_up(self, prompts: list[tuple[list[int], dict | None]], max_tokens: int) -> None:
        """Compiles, before `start`, the programs of every rows bucket × each prompt (ids, prepared images)
        × `max_tokens`'s new-token bucket, greedy and sampled with top-p: each prefills dummy rows and runs
        decode chunks in which every row is already done (no step runs)."""
        for n in self._rows.values():
            for prompt, images in prompts:
                for temperature, top_p in ((0.0, 1.0), (1.0, 0.9)):
                    batch = [Request(prompt, images, max_tokens, temperature=temperature, top_p=top_p)
                             for _ in range(n)]
                    rows, state, static = self._prepare(batch, [k for r in batch for k in self._keys(r)], done=True)
                    with jax.set_mesh(self.policy.mesh):
                        jax.block_until_ready(self._decode(self._state, state, np.zeros(len(state["done"]), bool),
                                                           **static))

    # ----- the engine thread -----

    def _run(self) -> None:
        carry = None
        while True:
            first = carry or self._queue.get()
            carry = None
            if first is None:
                return
            batch, rows = [first], first.n
            start = time.monotonic()
            while rows < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(start + self.wait_s - time.monotonic(), 0))
                except queue.Empty:
                    # requests still being parsed join too (clients answered together come back together),
                    # for at most ARRIVING_WAIT_S
                    if self.arriving and time.monotonic() < start + ARRIVING_WAIT_S:
                        time.sleep(0.0005)
                        continue
                    break
                if nxt is None or rows + nxt.n > self.max_batch:
                    carry = nxt
                    if nxt is None:
                        self._queue.put(None)  # stop after this batch
                    break
                batch.append(nxt)
                rows += nxt.n
            with self._count:
                self._waiting -= rows
            live = [r for r in batch if not r.cancelled]
            if live:
                self._serve(live)

    def _serve(self, batch: list[Request]) -> None:
        """Decodes a batch; a failure fails its own request, not the server or (before decoding) the batch."""
        keyed = []
        for r in batch:  # each request's own preparation: its failure is its own
            try:
                keyed.append((r, self._keys(r)))
            except Exception as e:
                r.emit(("error", f"{type(e).__name__}: {e}"))
        if not keyed:
            return
        try:
            rows, state, static = self._prepare([r for r, _ in keyed], [k for _, keys in keyed for k in keys])
        except Exception as e:  # the batch's arrays or prefill: each request is retried alone, to fail alone
            if len(keyed) == 1:
                keyed[0][0].emit(("error", f"{type(e).__name__}: {e}"))
            else:
                for r, _ in keyed:
                    self._serve([r])
            return
        try:
            self._generate(rows, state, static)
        except Exception as e:  # rows already streamed cannot start again: the requests still decoding fail
            for r in {id(row.request): row.request for row in rows if not row.finished}.values():
                r.emit(("error", f"{type(e).__name__}: {e}"))
        finally:
            self.stats["running"] = 0

    def _rows_bucket(self, n: int) -> int:
        R = min(_bucket(n), _bucket(self.max_batch))
        return R + -R % self.policy.mesh.devices.size

    def _keys(self, request: Request) -> list:
        if request.seed is None:
            self._draws += 1
            base = jax.random.fold_in(jax.random.key(self._entropy), self._draws)
        else:  # all 64 bits count (jax.random.key keeps only the low 32 without jax_enable_x64)
            bits = request.seed % 2**64
            base = jax.random.key(bits & 0xFFFFFFFF)
            if bits >> 32:
                base = jax.random.fold_in(base, np.uint32(bits >> 32))
        return [jax.random.fold_in(base, j) for j in range(request.n)]

    def _prepare(self, batch: list[Request], keys: list, done: bool = False) -> tuple[list[_Row], dict, dict]:
        """The batch's rows, its decode state after the prefill (`keys`: the rows' PRNG keys; `done`: every row
        done from the start, for `warm_up`), and the decode's static arguments."""
        policy = self.policy
        rows = [_Row(r, j) for r in batch for j in range(r.n)]
        R = self._rows_bucket(len(rows))
        T = _bucket(-(-max(len(r.request.prompt) for r in rows) // self.pad_to)) * self.pad_to
        ids, mask, arrays = sampling.collate_prompts(policy, [r.request.prompt for r in rows],
                                                     [r.request.images for r in rows], pad_to=T)
        M = _bucket(max(r.request.max_tokens for r in rows), least=LEAST_NEW_TOKENS)
        fields = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
        per_row = {f: np.array([getattr(r.request, f) for r in rows], np.float32) for f in fields}
        per_row.update(max_tokens=np.array([r.request.max_tokens for r in rows], np.int32),
                       ignore_eos=np.array([r.request.ignore_eos for r in rows], bool))
        keys = jnp.stack(keys + [jax.random.key(0)] * (R - len(rows)))
        ids, mask, arrays, per_row = sampling.to_devices(policy.mesh, R, ids, mask, arrays, per_row)
        positions = arrays.pop("positions", None)
        sample = bool(any(r.request.temperature > 0 for r in rows))
        static = {"steps": self.chunk, "prompt_len": T, "sample": sample,
                  "top_p": bool(any(r.request.top_p < 1 for r in rows if r.request.temperature > 0)),
                  "penalize": any(r.penalized for r in batch), "stop_ids": self.stop_ids,
                  "suppress": self.suppress, "pad_id": self.pad_id}
        with jax.set_mesh(policy.mesh):
            state = self._prefill(self._state, ids, mask, arrays, positions, per_row, keys, 0 if done else len(rows),
                                  length=T + M,
                                  penalize=static["penalize"])
        self._shapes.add((R, T, M, tuple((k, v.shape) for k, v in sorted(arrays.items())), static["sample"],
                          static["top_p"], static["penalize"]))
        self.stats["shapes"] = len(self._shapes)
        return rows, state, static

    def _generate(self, rows: list[_Row], state: dict, static: dict) -> None:
        self.stats["running"] = len(rows)
        ended = np.zeros(len(state["done"]), bool)  # rows the host ended (stop strings, clients gone)
        with jax.set_mesh(self.policy.mesh):
            while True:
                state, tokens = self._decode(self._state, state, ended, **static)
                count, tokens = np.asarray(state["count"]), np.asarray(tokens)
                ended[self._publish(rows, tokens, count)] = True
                if all(r.finished for r in rows):
                    break
        self.stats["batches"] += 1
        self.stats["rows"] += len(rows)
        self.stats["tokens"] += int(sum(len(r.tokens) for r in rows))

    def _through_stop(self, tokens: list[int], start: int, stop: tuple[str, ...]) -> int:
        """The fewest of `tokens` whose text holds a stop string (more than `start`, whose text held none):
        the completion's tokens, whatever the decode chunk went on to produce."""
        decode = self.policy.tokenizer.tokenizer.decode
        for k in range(start + 1, len(tokens)):
            with self.lock:
                text = decode(tokens[:k], skip_special_tokens=True)
            if any(s in text for s in stop):
                return k
        return len(tokens)

    def _publish(self, rows: list[_Row], tokens: np.ndarray, count: np.ndarray) -> list[int]:
        """Appends each row's new tokens, streams its new text, ends finished rows; returns the rows to mark
        done on the device."""
        stopped = []
        decode = self.policy.tokenizer.tokenizer.decode
        for i, row in enumerate(rows):
            if row.finished:
                continue
            request = row.request
            before = len(row.tokens)
            row.tokens.extend(tokens[i, :int(count[i]) - before].tolist())
            hit_stop = bool(row.tokens) and row.tokens[-1] in self.stop_ids and not request.ignore_eos
            ending = hit_stop or len(row.tokens) >= request.max_tokens or request.cancelled
            if not (ending or request.stream or request.stop):
                continue  # nobody reads the text before the end: decode it once then
            body = row.tokens[:-1] if hit_stop else row.tokens
            with self.lock:
                text = decode(body, skip_special_tokens=True)
            reason = "stop" if hit_stop else ("length" if len(row.tokens) >= request.max_tokens else None)
            cut = min((text.find(s) for s in request.stop if s in text), default=-1)
            if cut >= 0:
                text, reason = text[:cut], "stop"
                row.tokens = row.tokens[:self._through_stop(body, before, request.stop)]
            if request.cancelled:
                reason = "cancelled"
                self.stats["cancelled"] += 1
            if reason is None:  # hold back what a stop string or an unfinished character may still change
                hold = max((len(s) - 1 for s in request.stop), default=0)
                safe = len(text) - hold
                while safe > 0 and text[safe - 1] == "\ufffd":
                    safe -= 1
                if safe > row.sent:
                    request.emit(("delta", row.choice, text[row.sent:safe]))
                    row.sent = safe
                continue
            if len(text) > row.sent:
                request.emit(("delta", row.choice, text[row.sent:]))
            row.finished = True
            request.emit(("done", row.choice, reason, len(row.tokens)))
            if int(count[i]) < request.max_tokens and not hit_stop:
                stopped.append(i)
        return stopped


def _prefill(graphdef, params, ids, mask, arrays, positions, per_row, keys, real, *, length, penalize):
    """`sampling.prefill` of a batch's host-collated arrays, and the rest of the decode state: the per-row
    settings, PRNG keys, counts, `done` (the `real` rows first; padding rows are done from the start); with
    `penalize`, also each row's prompt tokens (`seen` bool[R, V]) and generated-token counts (`counts`
    int32[R, V]). All of it made here, so that the decode's first chunk gets the layouts later chunks get
    (one compiled program, not two)."""
    model = nnx.merge(graphdef, params)
    state = sampling.prefill(model, ids, mask, model.images_of(arrays), positions, length)
    R = ids.shape[0]
    state.update(per_row, keys=keys, done=jnp.arange(R) >= real, count=jnp.zeros(R, jnp.int32),
                 step=jnp.int32(0))
    if penalize:
        V = state["logits"].shape[1]
        rows = jnp.arange(R)[:, None]
        state["seen"] = jnp.zeros((R, V), bool).at[rows, jnp.where(mask > 0, ids, V)].set(True, mode="drop")
        state["counts"] = jnp.zeros((R, V), jnp.int32)
    return state


def penalize_logits(logits: jax.Array, s: dict) -> jax.Array:
    """float32[R, V] logits under each row's repetition penalty (on tokens of its prompt or generated), then
    its frequency and presence penalties (on generated tokens); neutral settings leave a row's logits exact."""
    generated = s["counts"] > 0
    rep = s["repetition_penalty"][:, None]
    logits = jnp.where(s["seen"] | generated, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    return (logits - s["frequency_penalty"][:, None] * s["counts"]
            - s["presence_penalty"][:, None] * generated.astype(logits.dtype))


def _decode(graphdef, params, state, ended, *, steps, prompt_len, sample, top_p, penalize, stop_ids, suppress,
            pad_id):
    """Up to `steps` decode steps (`sampling.step`) of every row not done or `ended` (bool[R], rows the host
    ended): (state, tokens int32[R, steps]); a row's tokens of this chunk are its first (new `count` − old
    `count`) entries. (`ended` is an argument, not an edit of the state, so that the state's layouts stay
    those the program was compiled for.)"""
    model = nnx.merge(graphdef, params)
    R = state["done"].shape[0]
    state = {**state, "done": state["done"] | ended}
    stop = jnp.asarray(stop_ids or (-1,), jnp.int32)

    def pick(s):
        logits = penalize_logits(s["logits"], s) if penalize else s["logits"]
        logits = logits.at[:, jnp.asarray(suppress)].set(-jnp.inf)
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        if sample:
            t = jnp.maximum(s["temperature"], 1e-6)[:, None]
            filtered = sampling.filter_rows(logits, t, 0, s["top_p"][:, None] if top_p else None)
            draw = jax.vmap(lambda key, row: jax.random.categorical(jax.random.fold_in(key, s["step"]), row))
            token = jnp.where(s["temperature"] > 0, draw(s["keys"], filtered).astype(jnp.int32), token)
        return token

    def body(carry):
        j, out, s = carry
        token = jnp.where(s["done"], pad_id, pick(s))
        count = s["count"] + (~s["done"]).astype(jnp.int32)
        done = s["done"] | (jnp.isin(token, stop) & ~s["ignore_eos"]) | (count >= s["max_tokens"])
        if penalize:
            s = {**s, "counts": s["counts"].at[jnp.arange(R), token].add((~s["done"]).astype(jnp.int32))}
        s = sampling.step(model, s, token, prompt_len + s["step"])
        return j + 1, out.at[:, j].set(token), {**s, "count": count, "done": done, "step": s["step"] + 1}

    def cond(carry):
        j, _, s = carry
        return (j < steps) & ~jnp.all(s["done"])

    _, out, state = jax.lax.while_loop(cond, body, (jnp.int32(0), jnp.full((R, steps), pad_id, jnp.int32), state))
    return state, out
