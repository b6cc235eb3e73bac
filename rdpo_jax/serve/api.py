"""The OpenAI chat completions API over the engine, as a Starlette app (served by uvicorn).

Routes: `POST /v1/chat/completions` (JSON, or server-sent events with `stream: true`), `GET /v1/models`,
`GET /health`. Errors are OpenAI-style JSON, `{"error": {"message", "type", "param", "code"}}`, with
their status: 400 for a bad request (the message names the field), 404 for another model's name or an
unknown route, 413 for a body, an image file or an image over its limit, 429 (with `Retry-After`) when
the queue is full, 503 (with `Retry-After`) while the model loads, 500 if a batch fails.

Images come as `image_url` parts: data URLs (base64), or local file paths (`file://…` or a plain path)
under the operator's `--allowed_local_media_path`; http(s) URLs are refused, since this server downloads
nothing. Parsing (`parsing.py`), image decoding and tokenization run in worker threads, off the event
loop; the engine thread decodes. A client that closes its connection, streaming or not, has its rows
dropped at the next decode chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from rdpo_jax.serve import engine as engine_lib
from rdpo_jax.serve.parsing import ERROR_TYPES, APIError, State, json_body, parse


def _error(e: APIError) -> JSONResponse:
    return JSONResponse({"error": {"message": e.message, "type": ERROR_TYPES.get(e.status, "Error"), "param": e.param,
                                   "code": e.status}}, status_code=e.status, headers=e.headers)


async def _body(http: HTTPRequest, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes (from its
    Content-Length, or while a chunked body streams in)."""
    too_big = APIError(413, f"the request body is over this server's limit of {limit} bytes (--max_request_bytes)")
    length = http.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def _disconnected(http: HTTPRequest) -> None:
    """Returns when the client has gone away (the body is read: the next ASGI message is the disconnect)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


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
                body = json_body(await _body(http, state.max_request_bytes))
                request, options = await run_in_threadpool(parse, body, state)
                loop, events = asyncio.get_running_loop(), asyncio.Queue()
                request.emit = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
                try:
                    engine.submit(request)
                except engine_lib.QueueFull as e:
                    raise APIError(429, f"the server is busy: {e}", headers={"Retry-After": "1"}) from None
        except APIError as e:
            return _error(e)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.name}
        if options["stream"]:  # Starlette cancels the stream when its client goes away (see `_stream`)
            return StreamingResponse(_stream(request, events, meta, options["include_usage"]),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        texts, reasons, tokens = [""] * request.n, [None] * request.n, 0
        gone = asyncio.ensure_future(_disconnected(http))  # Starlette does not watch a plain response's client
        try:
            while None in reasons:
                get = asyncio.ensure_future(events.get())
                await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():  # the client went away: its rows stop at the next chunk
                    get.cancel()
                    request.cancelled = True
                    return Response(status_code=499)  # nobody reads it (nginx's "client closed request")
                event = get.result()
                if event[0] == "error":
                    return _error(APIError(500, event[1]))
                if event[0] == "delta":
                    texts[event[1]] += event[2]
                else:
                    reasons[event[1]], tokens = event[2], tokens + event[3]
        except asyncio.CancelledError:  # the server shuts down under it
            request.cancelled = True
            raise
        finally:
            gone.cancel()
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
            return _error(e)
        engine = state.engine
        return JSONResponse({"status": "ok", **engine.stats, "waiting": engine.waiting, "shape_bound": engine.shape_bound})

    async def not_found(http: HTTPRequest, exc: HTTPException):
        return _error(APIError(exc.status_code if exc.status_code in (404, 405) else 400,
                               f"{http.method} {http.url.path}: {exc.detail}"))

    async def internal(http: HTTPRequest, exc: Exception):  # a bug, not the client's fault: still OpenAI-style JSON
        return _error(APIError(500, f"internal error: {type(exc).__name__}: {exc}"))

    async def lifespan(app):
        if on_startup:
            on_startup()
        yield
        if on_shutdown:
            on_shutdown()

    routes = [Route("/v1/chat/completions", completions, methods=["POST"]), Route("/v1/models", models),
              Route("/health", health)]
    return Starlette(routes=routes, exception_handlers={HTTPException: not_found, Exception: internal},
                     lifespan=contextlib.asynccontextmanager(lifespan))


def _usage(request: engine_lib.Request, completion: int) -> dict:
    return {"prompt_tokens": len(request.prompt.ids), "completion_tokens": completion,
            "total_tokens": len(request.prompt.ids) + completion}


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

