"""The OpenAI chat completions API over the engine, as a Starlette app (served by uvicorn).

Routes: `POST /v1/chat/completions` (JSON, or server-sent events with `stream: true`), `GET /v1/models`,
`GET /health`. Errors are OpenAI-style JSON, `{"error": {"message", "type", "param", "code"}}`, with
their status: 400 for a bad request (the message names the field), 404 for another model's name or an
unknown route, 413 for an image over the pixel budget, 429 (with `Retry-After`) when the queue is full,
503 (with `Retry-After`) while the model loads, 500 if a batch fails.

Images come as `image_url` parts: data URLs (base64) or local file paths (`file://…` or a plain path);
http(s) URLs are refused, since this server downloads nothing. Parsing, image decoding and tokenization
run in worker threads, off the event loop; the engine thread decodes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import io
import contextlib
import json
import threading
import time
import uuid
from typing import Any

from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from rdpo_jax.data import image_inputs, images
from rdpo_jax.data.tokenize import TemplateError
from rdpo_jax.serve import engine as engine_lib

ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 413: "RequestEntityTooLarge", 429: "RateLimitError",
               500: "InternalServerError", 503: "ServiceUnavailableError"}
# OpenAI parameters this server does not implement: a request that sets them is refused rather than
# answered as if they were not there.
UNSUPPORTED = ("logprobs", "top_logprobs", "tools", "tool_choice", "functions", "response_format", "logit_bias",
               "frequency_penalty", "presence_penalty")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "Error"),
                                       "param": self.param, "code": self.status}},
                            status_code=self.status, headers=self.headers)


@dataclasses.dataclass
class State:
    """What the app serves: set up by the command (`rdpo_jax.serve`), filled in once the model loads."""
    name: str  # the model name clients send (`GET /v1/models`)
    source: str  # the run directory or HF folder
    max_model_len: int | None = None  # prompt + completion tokens at most
    max_image_pixels: int = 4096 * 4096
    max_n: int = 8
    engine: engine_lib.Engine | None = None  # None while loading
    load_error: str | None = None
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))


# ----- request parsing (worker threads) -----

def _number(body: dict, key: str, default, low, high, *, integer=False, low_open=False):
    value = body.get(key)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise APIError(400, f"{key}: expected {'an integer' if integer else 'a number'}, got {json.dumps(value)}", key)
    if value < low or (low_open and value == low) or (high is not None and value > high):
        bounds = f"{'(' if low_open else '['}{low}, {high if high is not None else '∞'}]"
        raise APIError(400, f"{key}: {value} is outside {bounds}", key)
    return value


def _image_bytes(url: Any, where: str, max_pixels: int) -> bytes:
    if not isinstance(url, str) or not url:
        raise APIError(400, f"{where}: expected a URL string", where)
    if url.startswith(("http://", "https://")):
        raise APIError(400, f"{where}: http(s) image URLs are not fetched (this server downloads nothing); send a "
                            "data URL (data:image/png;base64,…) or a local file path", where)
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise APIError(400, f"{where}: expected a base64 data URL (data:image/…;base64,…)", where)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"{where}: the data URL's base64 payload does not decode", where) from None
    else:
        path = url[len("file://"):] if url.startswith("file://") else url
        if "://" in path:
            raise APIError(400, f"{where}: unsupported URL scheme in {url[:40]!r} (data URLs and local paths only)",
                           where)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise APIError(400, f"{where}: cannot read the local image {path!r} ({e.strerror})", where) from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Exception as e:  # PIL raises many exception types for bad input
        raise APIError(400, f"{where}: not an image ({type(e).__name__})", where) from None
    if width * height > max_pixels:
        raise APIError(413, f"{where}: the image has {width}×{height} = {width * height} pixels, over this server's "
                            f"budget of {max_pixels} (--max_image_pixels)", where)
    return data


def _messages(body: dict, max_pixels: int) -> tuple[list[dict], list[bytes]]:
    """OpenAI messages → the records' messages (image parts as {"type": "image"}) and the images' bytes."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages: expected a non-empty list of messages", "messages")
    out, blobs = [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise APIError(400, f"{where}.role: expected 'system', 'user' or 'assistant'", f"{where}.role")
        content = m.get("content")
        if content is None and m["role"] == "assistant":
            content = ""
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise APIError(400, f"{where}.content: expected a string or a list of parts", f"{where}.content")
        parts = []
        for j, part in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                blobs.append(_image_bytes(url, f"{at}.image_url.url", max_pixels))
                parts.append({"type": "image"})
            else:
                raise APIError(400, f"{at}: expected a text part or an image_url part", at)
        out.append({"role": m["role"], "content": parts})
    return out, blobs


def parse(body: Any, state: State) -> tuple[engine_lib.Request, dict]:
    """A chat completions body → (engine request without `emit`, response options); raises APIError."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != state.name:
        raise APIError(404, f"The model `{model}` does not exist (this server serves `{state.name}`).", "model")
    for key in UNSUPPORTED:
        if body.get(key) not in (None, False, 0, [], {}) and not (key == "response_format" and
                                                                   body[key] == {"type": "text"}):
            raise APIError(400, f"{key}: not supported by this server", key)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "stream: expected true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "stream_options: expected an object", "stream_options")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "stop: expected a non-empty string or a list of at most 4 of them", "stop")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    n = _number(body, "n", 1, 1, state.max_n, integer=True)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise APIError(400, "seed: expected an integer", "seed")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise APIError(400, "ignore_eos: expected true or false", "ignore_eos")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, None, 1, None, integer=True)

    messages, blobs = _messages(body, state.max_image_pixels)
    policy = state.engine.policy
    try:
        prepared = policy.image_input.prepare(blobs)
    except image_inputs.ImageBudgetError as e:
        raise APIError(413 if e.reason == "image_budget" else 400, f"messages: {e}", "messages") from None
    except images.ImageError as e:
        raise APIError(400, f"messages: image {getattr(e, 'index', '?')}: {e}", "messages") from None
    try:
        with state.engine.lock:
            prompt = policy.tokenizer.prompt(messages, prepared["tokens"] if prepared else [])
    except TemplateError as e:
        raise APIError(400, f"messages: {e}", "messages") from None
    room = state.max_model_len - len(prompt)
    if max_tokens is None:
        max_tokens = room
    if max_tokens > room or room < 1:
        raise APIError(400, f"This model's maximum context length is {state.max_model_len} tokens. However, you "
                            f"requested {len(prompt) + max_tokens} tokens ({len(prompt)} in the messages, "
                            f"{max_tokens} in the completion).", key)
    request = engine_lib.Request(prompt=prompt, images=prepared, max_tokens=max_tokens, temperature=float(temperature),
                                 top_p=float(top_p), n=n, seed=seed, stop=tuple(stop),
                                 ignore_eos=ignore_eos, stream=stream)
    return request, {"stream": stream, "include_usage": bool(options.get("include_usage"))}


# ----- the app -----

def create_app(state: State, on_startup=None, on_shutdown=None) -> Starlette:
    def ready():
        if state.engine is None:
            message = f"model failed to load: {state.load_error}" if state.load_error else "the model is loading"
            raise APIError(503, message, headers={"Retry-After": "5"})
        return state.engine

    async def completions(http: HTTPRequest):
        try:
            engine = ready()
            with engine.arrival():
                try:
                    body = json.loads(await http.body())
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise APIError(400, "the request body is not valid JSON") from None
                request, options = await run_in_threadpool(parse, body, state)
                loop, events = asyncio.get_running_loop(), asyncio.Queue()
                request.emit = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
                try:
                    engine.submit(request)
                except engine_lib.QueueFull as e:
                    raise APIError(429, f"the server is busy: {e}", headers={"Retry-After": "1"}) from None
        except APIError as e:
            return e.response()
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.name}
        if options["stream"]:
            return StreamingResponse(_stream(request, events, meta, options["include_usage"]),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            texts, reasons, tokens = [""] * request.n, [None] * request.n, 0
            while None in reasons:
                event = await events.get()
                if event[0] == "error":
                    return APIError(500, event[1]).response()
                if event[0] == "delta":
                    texts[event[1]] += event[2]
                else:
                    reasons[event[1]], tokens = event[2], tokens + event[3]
        except asyncio.CancelledError:  # the client went away: its rows stop at the next chunk
            request.cancelled = True
            raise
        return JSONResponse({**meta, "object": "chat.completion",
                             "choices": [{"index": j, "message": {"role": "assistant", "content": texts[j]},
                                          "logprobs": None, "finish_reason": reasons[j]} for j in range(request.n)],
                             "usage": _usage(request, tokens)})

    async def models(http: HTTPRequest):
        return JSONResponse({"object": "list", "data": [{"id": state.name, "object": "model", "created": state.created,
                                                         "owned_by": "rdpo_jax", "root": state.source,
                                                         "max_model_len": state.max_model_len}]})

    async def health(http: HTTPRequest):
        try:
            ready()
        except APIError as e:
            return e.response()
        return JSONResponse({"status": "ok", **state.engine.stats, "waiting": state.engine.waiting})

    async def not_found(http: HTTPRequest, exc: HTTPException):
        return APIError(exc.status_code if exc.status_code in (404, 405) else 400,
                        f"{http.method} {http.url.path}: {exc.detail}").response()

    async def lifespan(app):
        if on_startup:
            on_startup()
        yield
        if on_shutdown:
            on_shutdown()

    routes = [Route("/v1/chat/completions", completions, methods=["POST"]), Route("/v1/models", models),
              Route("/health", health)]
    return Starlette(routes=routes, exception_handlers={HTTPException: not_found},
                     lifespan=contextlib.asynccontextmanager(lifespan))


def _usage(request: engine_lib.Request, completion: int) -> dict:
    return {"prompt_tokens": len(request.prompt), "completion_tokens": completion,
            "total_tokens": len(request.prompt) + completion}


async def _stream(request, events, meta, include_usage):
    def chunk(choices, **extra):
        return "data: " + json.dumps({**meta, "object": "chat.completion.chunk", "choices": choices, **extra}) + "\n\n"

    finished, tokens = 0, 0
    try:
        for j in range(request.n):
            yield chunk([{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        while finished < request.n:
            event = await events.get()
            if event[0] == "error":
                error = {"message": event[1], "type": ERROR_TYPES[500], "param": None, "code": 500}
                yield "data: " + json.dumps({"error": error}) + "\n\n"
                return
            if event[0] == "delta":
                yield chunk([{"index": event[1], "delta": {"content": event[2]}, "logprobs": None, "finish_reason": None}])
            else:
                finished, tokens = finished + 1, tokens + event[3]
                yield chunk([{"index": event[1], "delta": {}, "logprobs": None, "finish_reason": event[2]}])
        if include_usage:
            yield chunk([], usage=_usage(request, tokens))
        yield "data: [DONE]\n\n"
    finally:
        if finished < request.n:
            request.cancelled = True


def load_in_background(state: State, load, *, on_error=None) -> threading.Thread:
    """Runs `load()` (→ Engine) in a thread and serves it when done; a failure is kept for the 503s and
    passed to `on_error`."""
    def run():
        try:
            state.engine = load()
        except Exception as e:  # the server says why instead of dying silently
            state.load_error = f"{type(e).__name__}: {e}"
            if on_error:
                on_error(e)

    thread = threading.Thread(target=run, name="load", daemon=True)
    thread.start()
    return thread

