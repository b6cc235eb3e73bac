"""A judge behind an OpenAI-compatible chat endpoint (a vLLM or SGLang server hosting a large VLM).

- `ChatClient`: POST {base_url}/chat/completions with timeouts, retries with exponential backoff on
  connection errors, timeouts, 429 and 5xx, honouring `Retry-After` up to a cap (counted in `stats`);
  the API key comes from an environment variable and never appears in messages or logs.
- `VerdictCache`: SQLite, keyed by (prompt, images, answer, rubric, judge model, prompt version), so a
  restarted run never pays for a verdict twice. Only verdicts are cached, never failures.
- `OpenAIJudge`: images as data URLs (text-only items have none), the rubric prompt of `prompt.py`,
  strict parsing (`parse.py`) with re-asks on invalid replies (a `content: null` reply is one), bounded
  concurrency; an item that still fails — or raises anything unexpected — is unscorable with its reason,
  counted.
"""

from __future__ import annotations

import base64
import concurrent.futures
import email.utils
import hashlib
import http.client
import json
import logging
import math
import os
import random
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

from rdpo_jax.rubrics import prompt
from rdpo_jax.rubrics.judge import Item, JudgeOutputError, Verdict
from rdpo_jax.rubrics.parse import parse_verdict

RETRY_STATUS = {429, 500, 502, 503, 504}


class EndpointError(RuntimeError):
    """The endpoint failed for good (retries exhausted, or a request it refuses)."""


def _retry_after(value: str | None) -> float | None:
    """Seconds a `Retry-After` header asks for (delta seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):  # a garbled header must not fail the request
            return None
    return None if math.isnan(seconds) else max(seconds, 0.0)


class ChatClient:
    """A chat completions client.

    Args:
      base_url: the endpoint's base URL (…/v1).
      model: the model name sent with every request.
      api_key_env: environment variable holding the API key (none: no Authorization header).
      timeout: seconds per request.
      max_retries: retries after the first attempt.
      backoff, max_backoff: the exponential backoff's first and longest wait, in seconds (jittered).
      max_retry_after: the longest wait a server's `Retry-After` gets, in seconds: an overloaded server
        may ask for an hour, and one stalled item would hold its worker (and the batch) that long.

    `stats` counts requests, retries, `retry_after` (waits a server asked for) and `retry_after_capped`
    (those cut to `max_retry_after`).
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0,
                 max_retries: int = 4, backoff: float = 1.0, max_backoff: float = 30.0, max_retry_after: float = 60.0):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.timeout, self.max_retries = model, timeout, max_retries
        self.backoff, self.max_backoff, self.max_retry_after = backoff, max_backoff, max_retry_after
        self._key = os.environ.get(api_key_env, "")
        self.stats = {"requests": 0, "retries": 0, "retry_after": 0, "retry_after_capped": 0}
        self._lock = threading.Lock()

    def _count(self, name: str) -> None:
        with self._lock:
            self.stats[name] += 1

    def complete(self, messages: list[dict], *, temperature: float = 0.0, max_tokens: int = 1024) -> str | None:
        """The first choice's `message.content`: None when the server sends none (a refusal or a tool
        call comes as `content: null`). Raises EndpointError when the endpoint fails for good."""
        body = json.dumps({"model": self.model, "messages": messages, "temperature": temperature,
                           "max_tokens": max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            asked = None  # seconds the server asks us to wait (Retry-After)
            self._count("requests")
            try:
                request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = json.loads(response.read())
                return payload["choices"][0]["message"].get("content")
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}"
                if e.code not in RETRY_STATUS:
                    raise EndpointError(f"{self.url}: HTTP {e.code} {e.reason}") from None
                asked = _retry_after(e.headers.get("Retry-After"))
            # HTTPException: a body cut short (IncompleteRead) or a garbled status line, not an OSError
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                last = "malformed response body"
            if attempt < self.max_retries:
                self._count("retries")
                wait = min(self.backoff * 2 ** attempt, self.max_backoff) * (0.5 + random.random() / 2)
                if asked is not None:
                    self._count("retry_after")
                    if asked > self.max_retry_after:
                        self._count("retry_after_capped")
                    wait = min(asked, self.max_retry_after) or wait  # "0" (retry now) keeps the backoff
                time.sleep(wait)
        raise EndpointError(f"{self.url}: gave up after {self.max_retries + 1} attempts (last: {last})")


class VerdictCache:
    """item key → verdict, in SQLite (safe to share between threads of one process)."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False)
        self._db.execute("CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self._db.commit()
        self._lock = threading.Lock()

    def get(self, key: str) -> Verdict | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM verdicts WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        value = json.loads(row[0])
        return Verdict(value["scores"], value["reasons"])

    def put(self, key: str, verdict: Verdict) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO verdicts VALUES (?, ?)",
                             (key, json.dumps({"scores": verdict.scores, "reasons": verdict.reasons})))
            self._db.commit()

    def close(self) -> None:
        self._db.close()


def cache_key(item: Item, model: str) -> str:
    """The verdict cache key: everything the verdict depends on, judge model and prompt version included,
    so that a changed judge never gets a stale verdict."""
    payload = {"messages": item.messages, "images": [hashlib.sha256(b).hexdigest() for b in item.images],
               "answer": item.answer, "rubric": item.rubric, "reference": item.reference_answer, "model": model,
               "prompt_version": prompt.PROMPT_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _mime(data: bytes) -> str:
    for magic, mime in ((b"\x89PNG", "image/png"), (b"\xff\xd8", "image/jpeg"), (b"GIF8", "image/gif"),
                        (b"RIFF", "image/webp")):
        if data.startswith(magic):
            return mime
    return "application/octet-stream"


def with_data_urls(messages: list[dict], images: Sequence[bytes]) -> list[dict]:
    """Image parts → OpenAI `image_url` parts holding the images as base64 data URLs, in order."""
    it = iter(images)

    def part(p: dict) -> dict:
        if p["type"] != "image":
            return p
        data = next(it)
        return {"type": "image_url", "image_url": {"url": f"data:{_mime(data)};base64,{base64.b64encode(data).decode()}"}}

    return [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else
             [part(p) for p in m["content"]]} for m in messages]


class OpenAIJudge:
    """Judges items at an endpoint, `concurrency` in flight, each verdict cached.

    `stats` counts cached and judged items, unscorable ones, re-asks, and `errors`: items that raised
    something unexpected (a bug or a server reply no rule foresaw), unscorable with the exception named
    and the first traceback of each kind logged, so that one item never ends a whole batch unseen.
    """

    def __init__(self, client: ChatClient, cache: VerdictCache, *, concurrency: int = 8, attempts: int = 3,
                 max_tokens: int = 1024):
        self.client, self.cache, self.concurrency, self.attempts = client, cache, concurrency, attempts
        self.max_tokens = max_tokens
        self.name = f"openai:{client.model}"
        self.stats = {"cached": 0, "judged": 0, "unscorable": 0, "reasks": 0, "errors": 0}
        self._lock = threading.Lock()
        self._logged: set[str] = set()  # exception types already logged with a traceback

    def _count(self, name: str) -> None:
        with self._lock:
            self.stats[name] += 1

    def _one(self, item: Item, key: str) -> Verdict:
        messages = with_data_urls(prompt.judge_messages(item), item.images)
        error: Exception | None = None
        for attempt in range(self.attempts):
            try:
                reply = self.client.complete(messages, max_tokens=self.max_tokens)
            except EndpointError as e:
                self._count("unscorable")
                return Verdict.failed(f"endpoint: {e}")
            try:
                verdict = parse_verdict(reply, item.rubric)
            except JudgeOutputError as e:
                error = e
                if attempt + 1 < self.attempts:
                    self._count("reasks")
                    again = (f"That reply is not a valid verdict: {e}. Reply again with the JSON only, one entry "
                             "for every criterion id.")
                    # "" for a null reply: chat templates want alternating turns with text in each
                    messages = messages + [{"role": "assistant", "content": reply or ""},
                                           {"role": "user", "content": again}]
                continue
            self.cache.put(key, verdict)
            self._count("judged")
            return verdict
        self._count("unscorable")
        return Verdict.failed(f"invalid verdict after {self.attempts} attempts: {error}")

    def _guarded(self, item: Item, key: str) -> Verdict:
        """`_one`, with anything it raises turned into this item's unscorable verdict (see the class doc)."""
        try:
            return self._one(item, key)
        except Exception as e:  # not swallowed: named in the verdict, counted in the stats, logged
            name = type(e).__name__
            with self._lock:
                self.stats["errors"] += 1
                self.stats["unscorable"] += 1
                first = name not in self._logged
                self._logged.add(name)
            if first:
                logging.getLogger(__name__).exception("judging %s raised (later %s are only counted)", item.key, name)
            return Verdict.failed(f"internal error: {name}: {e}")

    def judge(self, items: Sequence[Item]) -> list[Verdict]:
        keys = [cache_key(item, self.client.model) for item in items]
        out: list[Verdict | None] = [self.cache.get(k) for k in keys]
        self.stats["cached"] += sum(v is not None for v in out)
        todo = [i for i, v in enumerate(out) if v is None]
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            for i, verdict in zip(todo, pool.map(lambda i: self._guarded(items[i], keys[i]), todo)):
                out[i] = verdict
        return out
