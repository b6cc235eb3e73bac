"""The serving engine: requests gathered into batches and decoded together with a KV cache.

One thread owns the model. It waits for a request, gathers the others that arrive within `wait_s`, or
while requests are still being parsed (up to 50 ms), up to `max_batch` rows (a request asking for n
choices is n rows), and decodes them as one batch. Prefill is one jitted call; decoding runs jitted
chunks of `chunk` steps, and between chunks the host streams each row's new text, applies stop strings
and drops cancelled rows. Prefill and chunks are `sampling.begin` and `sampling.decode`, the decode loop
`sampling.generate` runs whole, so a served answer is `data_prep.sample`'s for the same prompt and
settings. A request's settings (`sampling.SamplingConfig`: temperature, top-p, penalties, max_tokens as
max_new_tokens, n as num_samples, ignore_eos) and PRNG keys (row j of a request with a seed draws step i
with fold_in(fold_in(key(seed), j), i)) are per row, so rows of different requests share a batch.

Shapes: rows pad to a power of two (and to the mesh's devices), prompts (left-padded) to `pad_to` times
a power of two, new tokens to a power of two from 16; so the programs one server can compile are at
most rows buckets × prompt buckets × new-token buckets (`shape_bound`, per image layout and sampling
variant), however odd the requests. `warm_up` compiles the common ones before the first request.

A request whose preparation fails (its arrays, its keys, the prefill) is retried alone, so it fails
alone; a failure while decoding fails the requests still decoding in that batch.
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
from rdpo_jax.data.tokenize import Prompt


ARRIVING_WAIT_S = 0.05  # the longest a batch waits for requests still being parsed
LEAST_NEW_TOKENS = 16  # the smallest new-token bucket


class QueueFull(RuntimeError):
    """More rows are waiting than the queue holds."""


@dataclasses.dataclass(eq=False)
class Request:
    """One chat completion: its prompt (`ChatTokenizer.encode`), its sampling settings (`num_samples`
    choices of at most `max_new_tokens` tokens each) and the seed of their PRNG keys (None: fresh ones).

    `emit(event)` is called from the engine thread with ("delta", choice, text) while a choice is
    generated (with `stream`; else one delta at its end), ("done", choice, finish_reason,
    completion_tokens) when it ends, or ("error", message)."""
    prompt: Prompt
    sampling: sampling.SamplingConfig
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings
    stream: bool = False  # text is emitted as it comes (else once, when the choice ends)
    emit: Callable = print
    cancelled: bool = False

    @property
    def n(self) -> int:
        return self.sampling.num_samples


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
                 pad_to: int = 64, chunk: int = 16, max_model_len: int | None = None):
        self.policy, self.max_batch, self.wait_s, self.max_queue = policy, max_batch, wait_s, max_queue
        self.pad_to, self.chunk = pad_to, chunk
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
        self._begin = jax.jit(functools.partial(_begin, graphdef), static_argnames=("length", "penalize"))
        self._decode = jax.jit(functools.partial(_decode, graphdef), donate_argnums=(1,),
                               static_argnames=("steps", "prompt_len", "variant"))
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

    def warm_up(self, prompts: list[Prompt], max_tokens: int) -> None:
        """Compiles, before `start`, the programs of every rows bucket × each prompt × `max_tokens`'s
        new-token bucket, greedy and sampled with top-p: each prefills dummy rows and runs decode chunks in
        which every row is already done (no step runs)."""
        for n in self._rows.values():
            for prompt in prompts:
                for temperature, top_p in ((0.0, 1.0), (1.0, 0.9)):
                    settings = self.policy.sampling_config(max_new_tokens=max_tokens, temperature=temperature,
                                                           top_p=top_p)
                    batch = [Request(prompt, settings) for _ in range(n)]
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
        settings = [r.request.sampling for r in rows]
        variant = sampling.Variant.of(settings)
        R = self._rows_bucket(len(rows))
        T = _bucket(-(-max(len(r.request.prompt.ids) for r in rows) // self.pad_to)) * self.pad_to
        M = _bucket(max(s.max_new_tokens for s in settings), least=LEAST_NEW_TOKENS)
        ids, mask, arrays = sampling.collate(policy, [r.request.prompt for r in rows], T)
        keys = jnp.stack(keys + [jax.random.key(0)] * (R - len(rows)))
        ids, mask, arrays, per_row = sampling.to_devices(policy.mesh, R, ids, mask, arrays,
                                                         sampling.row_settings(settings))
        positions = arrays.pop("positions", None)
        with jax.set_mesh(policy.mesh):
            state = self._begin(self._state, ids, mask, arrays, positions, per_row, keys, 0 if done else len(rows),
                                length=T + M, penalize=variant.penalize)
        self._shapes.add((R, T, M, tuple((k, v.shape) for k, v in sorted(arrays.items())), variant.sample,
                          variant.top_p, variant.penalize))
        self.stats["shapes"] = len(self._shapes)
        return rows, state, {"steps": self.chunk, "prompt_len": T, "variant": variant}

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
        for k in range(start + 1, len(tokens)):
            text = self.policy.tokenizer.decode(tokens[:k])
            if any(s in text for s in stop):
                return k
        return len(tokens)

    def _publish(self, rows: list[_Row], tokens: np.ndarray, count: np.ndarray) -> list[int]:
        """Appends each row's new tokens, streams its new text, ends finished rows; returns the rows to mark
        done on the device."""
        stopped = []
        for i, row in enumerate(rows):
            if row.finished:
                continue
            request, settings = row.request, row.request.sampling
            before = len(row.tokens)
            row.tokens.extend(tokens[i, :int(count[i]) - before].tolist())
            hit_stop = bool(row.tokens) and row.tokens[-1] in settings.stop_ids and not settings.ignore_eos
            full = len(row.tokens) >= settings.max_new_tokens
            if not (hit_stop or full or request.cancelled or request.stream or request.stop):
                continue  # nobody reads the text before the end: decode it once then
            body = row.tokens[:-1] if hit_stop else row.tokens
            text = self.policy.tokenizer.decode(body)
            reason = "stop" if hit_stop else ("length" if full else None)
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
            if int(count[i]) < settings.max_new_tokens and not hit_stop:
                stopped.append(i)
        return stopped


def _begin(graphdef, params, ids, mask, arrays, positions, per_row, keys, real, *, length, penalize):
    """`sampling.begin` of a batch's host-collated arrays, the `real` rows first (padding rows are done from
    the start). The whole decode state is made here, so that the decode's first chunk gets the layouts later
    chunks get (one compiled program, not two)."""
    model = nnx.merge(graphdef, params)
    return sampling.begin(model, ids, mask, model.images_of(arrays), positions, length, per_row, keys,
                          live=jnp.arange(ids.shape[0]) < real, penalize=penalize)


def _decode(graphdef, params, state, ended, *, steps, prompt_len, variant):
    """`sampling.decode` of every row not done or `ended` (bool[R], rows the host ended). (`ended` is an
    argument, not an edit of the state, so that the state's layouts stay those the program was compiled
    for.)"""
    model = nnx.merge(graphdef, params)
    return sampling.decode(model, {**state, "done": state["done"] | ended}, variant, steps=steps,
                           prompt_len=prompt_len)
