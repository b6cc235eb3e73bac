"""A judge behind an OpenAI-compatible chat endpoint (a vLLM or SGLang server hosting a large VLM).

- `ChatClient`: POST {base_url}/chat/completions with timeouts, retries with exponential backoff on
  connection errors, timeouts, 429 and 5xx, honouring `Retry-After`; the API key comes from an
  environment variable and never appears in messages or logs.
- `VerdictCache`: SQLite, keyed by (prompt, images, answer, rubric, judge model, prompt version), so a
  restarted run never pays for a verdict twice. Only verdicts are cached, never failures.
- `OpenAIJudge`: images as data URLs, the rubric prompt of `judge.py`, strict parsing with re-asks on
  invalid replies, bounded concurrency; an item that still fails is unscorable with its reason.
"""

from __future__ import annotations

import base64
import concurrent.futures
import email.utils
import hashlib
import json
import os
import random
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

from rdpo_jax.rubrics.judge import Item, JudgeOutputError, PROMPT_VERSION, Verdict, judge_messages, parse_verdict

RETRY_STATUS = {429, 500, 502, 503, 504}


class EndpointError(RuntimeError):
    """The endpoint failed for good (retries exhausted, or a request it refuses)."""


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value)
        return max(parsed.timestamp() - time.time(), 0.0) if parsed else None


class ChatClient:
    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0,
                 max_retries: int = 4, backoff: float = 1.0, max_backoff: float = 30.0):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.timeout, self.max_retries = model, timeout, max_retries
        self.backoff, self.max_backoff = backoff, max_backoff
        self._key = os.environ.get(api_key_env, "")
        self.stats = {"requests": 0, "retries": 0}
        self._lock = threading.Lock()

    def _count(self, name: str) -> None:
        with self._lock:
            self.stats[name] += 1

    def complete(self, messages: list[dict], *, temperature: float = 0.0, max_tokens: int = 1024) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": temperature,
                           "max_tokens": max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            wait = min(self.backoff * 2 ** attempt, self.max_backoff) * (0.5 + random.random() / 2)
            self._count("requests")
            try:
                request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = json.loads(response.read())
                return payload["choices"][0]["message"]["content"]
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}"
                if e.code not in RETRY_STATUS:
                    raise EndpointError(f"{self.url}: HTTP {e.code} {e.reason}") from None
                wait = _retry_after(e.headers.get("Retry-After")) or wait
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except (ValueError, KeyError, IndexError, TypeError):
                last = "malformed response body"
            if attempt < self.max_retries:
                self._count("retries")
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
    payload = {"messages": item.messages, "images": [hashlib.sha256(b).hexdigest() for b in item.images],
               "answer": item.answer, "rubric": item.rubric, "reference": item.reference_answer, "model": model,
               "prompt_version": PROMPT_VERSION}
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
    def __init__(self, client: ChatClient, cache: VerdictCache, *, concurrency: int = 8, attempts: int = 3,
                 max_tokens: int = 1024):
        self.client, self.cache, self.concurrency, self.attempts = client, cache, concurrency, attempts
        self.max_tokens = max_tokens
        self.name = f"openai:{client.model}"
        self.stats = {"cached": 0, "judged": 0, "unscorable": 0, "reasks": 0}
        self._lock = threading.Lock()

    def _count(self, name: str) -> None:
        with self._lock:
            self.stats[name] += 1

    def _one(self, item: Item, key: str) -> Verdict:
        messages = with_data_urls(judge_messages(item), item.images)
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
                    messages = messages + [{"role": "assistant", "content": reply}, {"role": "user", "content": (
                        f"That reply is not a valid verdict: {e}. Reply again with the JSON only, one entry "
                        "for every criterion id.")}]
                continue
            self.cache.put(key, verdict)
            self._count("judged")
            return verdict
        self._count("unscorable")
        return Verdict.failed(f"invalid verdict after {self.attempts} attempts: {error}")

    def judge(self, items: Sequence[Item]) -> list[Verdict]:
        keys = [cache_key(item, self.client.model) for item in items]
        out: list[Verdict | None] = [self.cache.get(k) for k in keys]
        self.stats["cached"] += sum(v is not None for v in out)
        todo = [i for i, v in enumerate(out) if v is None]
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            for i, verdict in zip(todo, pool.map(lambda i: self._one(items[i], keys[i]), todo)):
                out[i] = verdict
        return out
