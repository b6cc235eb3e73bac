"""The serving engine: requests gathered into batches and decoded together with a KV cache.

One thread owns the model. It waits for a request, gathers the others that arrive within `wait_s`, or
while requests are still being parsed (up to 50 ms), up to `max_batch` rows (a request asking for n
choices is n rows), and decodes them as one batch: rows
padded to a power of two and to the mesh's devices, prompts left-padded to a multiple of `pad_to`, new
tokens to a power of two, so that few shapes compile. Prefill is one jitted call; decoding runs jitted
chunks of `chunk` steps (a `while_loop` that also stops when every row is done), and between chunks the
host streams each row's new text, applies stop strings and drops cancelled rows. Per row: temperature
(0 = greedy), top-p, max_tokens and a PRNG key (row j of a request with a seed draws step i with
fold_in(fold_in(key(seed), j), i)), so rows of different requests share a batch.

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


class QueueFull(RuntimeError):
    """More rows are waiting than the queue holds."""


@dataclasses.dataclass(eq=False)
class Request:
    """One chat completion: a tokenized prompt, its prepared images and the sampling settings.

    `emit(event)` is called from the engine thread with ("delta", choice, text) while a choice is
    generated (with `stream`; else one delta at its end), ("done", choice, finish_reason, completion_tokens) when it ends, or ("error", message)."""
    prompt: list[int]
    images: dict | None
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # decode max_tokens tokens whatever the model emits (vLLM's extension)
    stream: bool = False  # text is emitted as it comes (else once, when the choice ends)
    emit: Callable = print
    cancelled: bool = False


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
    """Batches and decodes `Request`s for a loaded `inference.Policy` in its own thread (`start`)."""

    def __init__(self, policy, *, max_batch: int = 32, wait_s: float = 0.005, max_queue: int = 256,
                 pad_to: int = 64, chunk: int = 16, lock: threading.Lock | None = None):
        self.policy, self.max_batch, self.wait_s, self.max_queue = policy, max_batch, wait_s, max_queue
        self.pad_to, self.chunk = pad_to, chunk
        self.lock = lock or threading.Lock()  # the tokenizer is shared with the request handlers
        self.stop_ids = policy.tokenizer.stop_ids()
        self.pad_id = policy.tokenizer.pad_id
        self.suppress = (policy.config.image_token_id,)
        self._queue: queue.Queue = queue.Queue()
        self._waiting = 0  # rows submitted and not yet taken into a batch
        self.arriving = 0  # requests being parsed (see `arrival`)
        self._count = threading.Lock()
        self._thread = None
        self._entropy = int.from_bytes(os.urandom(4), "little")
        self._draws = 0
        self.stats = {"batches": 0, "rows": 0, "tokens": 0, "running": 0}  # running: rows of the batch decoding
        graphdef, state = nnx.split(policy.model)
        self._prefill = jax.jit(functools.partial(_prefill, graphdef), static_argnames=("length",))
        self._decode = jax.jit(functools.partial(_decode, graphdef), donate_argnums=(1,),
                               static_argnames=("steps", "prompt_len", "sample", "top_p", "stop_ids", "suppress",
                                                "pad_id"))
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
            if not live:
                continue
            try:
                self._generate(live)
            except Exception as e:  # a failed batch fails its requests, not the server
                for r in live:
                    r.emit(("error", f"{type(e).__name__}: {e}"))
            finally:
                self.stats["running"] = 0

    def _keys(self, request: Request) -> list:
        if request.seed is None:
            self._draws += 1
            base = jax.random.fold_in(jax.random.key(self._entropy), self._draws)
        else:
            base = jax.random.key(request.seed)
        return [jax.random.fold_in(base, j) for j in range(request.n)]

    def _generate(self, batch: list[Request]) -> None:
        policy = self.policy
        rows = [_Row(r, j) for r in batch for j in range(r.n)]
        R = min(_bucket(len(rows)), _bucket(self.max_batch))
        R += -R % policy.mesh.devices.size
        ids, mask, arrays = sampling.collate_prompts(policy, [r.request.prompt for r in rows],
                                                     [r.request.images for r in rows], pad_to=self.pad_to)
        T = ids.shape[1]
        M = _bucket(max(r.request.max_tokens for r in rows), least=16)
        per_row = {
            "temperature": np.array([r.request.temperature for r in rows], np.float32),
            "top_p": np.array([r.request.top_p for r in rows], np.float32),
            "max_tokens": np.array([r.request.max_tokens for r in rows], np.int32),
            "done": np.zeros(len(rows), bool),  # (padding rows: set below)
            "ignore_eos": np.array([r.request.ignore_eos for r in rows], bool),
        }
        keys = jnp.stack([k for r in batch for k in self._keys(r)] + [jax.random.key(0)] * (R - len(rows)))
        ids, mask, arrays, per_row = sampling.to_devices(policy.mesh, R, ids, mask, arrays, per_row)
        per_row["done"] = per_row["done"].at[len(rows):].set(True)  # padding rows are done from the start
        positions = arrays.pop("positions", None)
        sample = bool(any(r.request.temperature > 0 for r in rows))
        top_p = bool(any(r.request.top_p < 1 for r in rows if r.request.temperature > 0))
        self.stats["running"] = len(rows)
        with jax.set_mesh(policy.mesh):
            state = self._prefill(self._state, ids, mask, arrays, positions, length=T + M)
            state.update(per_row, keys=keys, count=jnp.zeros(R, jnp.int32), step=jnp.int32(0))
            while True:
                state, tokens = self._decode(self._state, state, steps=self.chunk, prompt_len=T, sample=sample,
                                             top_p=top_p, stop_ids=self.stop_ids, suppress=self.suppress,
                                             pad_id=self.pad_id)
                count, tokens = np.asarray(state["count"]), np.asarray(tokens)
                stopped = self._publish(rows, tokens, count)
                if stopped:  # stop strings and cancelled requests end rows the device does not know of
                    state["done"] = state["done"].at[np.asarray(stopped)].set(True)
                if all(r.finished for r in rows):
                    break
        self.stats["batches"] += 1
        self.stats["rows"] += len(rows)
        self.stats["tokens"] += int(sum(len(r.tokens) for r in rows))

    def _publish(self, rows: list[_Row], tokens: np.ndarray, count: np.ndarray) -> list[int]:
        """Appends each row's new tokens, streams its new text, ends finished rows; returns the rows to mark
        done on the device."""
        stopped = []
        decode = self.policy.tokenizer.tokenizer.decode
        for i, row in enumerate(rows):
            if row.finished:
                continue
            request = row.request
            new = int(count[i]) - len(row.tokens)
            row.tokens.extend(tokens[i, :new].tolist())
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
            if request.cancelled:
                reason = "cancelled"
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


def _prefill(graphdef, params, ids, mask, arrays, positions, *, length):
    """`sampling.prefill` of a batch's host-collated arrays."""
    model = nnx.merge(graphdef, params)
    return sampling.prefill(model, ids, mask, model.images_of(arrays), positions, length)


def _decode(graphdef, params, state, *, steps, prompt_len, sample, top_p, stop_ids, suppress, pad_id):
    """Up to `steps` decode steps (`sampling.step`) of every row not done: (state, tokens int32[R, steps]);
    a row's tokens of this chunk are its first (new `count` − old `count`) entries."""
    model = nnx.merge(graphdef, params)
    R = state["done"].shape[0]
    stop = jnp.asarray(stop_ids or (-1,), jnp.int32)

    def pick(s):
        logits = s["logits"].at[:, jnp.asarray(suppress)].set(-jnp.inf)
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
        s = sampling.step(model, s, token, prompt_len + s["step"])
        return j + 1, out.at[:, j].set(token), {**s, "count": count, "done": done, "step": s["step"] + 1}

    def cond(carry):
        j, _, s = carry
        return (j < steps) & ~jnp.all(s["done"])

    _, out, state = jax.lax.while_loop(cond, body, (jnp.int32(0), jnp.full((R, steps), pad_id, jnp.int32), state))
    return state, out
