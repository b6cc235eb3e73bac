"""A chat completions request body → an engine `Request`, every field checked before it can join a batch.

Everything a client controls is validated here, in a worker thread, so that a bad request gets its own
4xx naming the field and never reaches the batch it would have shared: numbers within their ranges (NaN
and Infinity are not JSON), a seed within int64 (vLLM's range), images decoded and within their budgets,
local files only under the operator's `--allowed_local_media_path`, the prompt and `max_tokens` within
`--max_model_len` (vLLM's wording).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import math
import os
import stat
import time
from typing import Any

from PIL import Image

from rdpo_jax.data import images
from rdpo_jax.data.tokenize import TemplateError
from rdpo_jax.serve import engine as engine_lib

ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 413: "RequestEntityTooLarge", 429: "RateLimitError",
               500: "InternalServerError", 503: "ServiceUnavailableError"}
# Parameters this server does not implement — OpenAI's, and vLLM's sampling extensions that clients and
# evaluation harnesses send to vLLM — with the values that ask for nothing (what the field's absence
# means): a request that sets one to anything else is refused by name rather than answered as if it had not.
_OFF = (False, 0, [], {})
UNSUPPORTED: dict[str, tuple] = {
    "logprobs": _OFF, "top_logprobs": _OFF, "tools": _OFF, "tool_choice": (*_OFF, "none"), "functions": _OFF,
    "response_format": (*_OFF, {"type": "text"}), "logit_bias": _OFF,
    "top_k": (0, -1), "min_p": (0,), "min_tokens": (0,), "stop_token_ids": ([],), "bad_words": ([],),
    "best_of": (1,), "use_beam_search": (False,), "length_penalty": (1,), "echo": (False,),
    "prompt_logprobs": (0,), "include_stop_str_in_output": (False,), "skip_special_tokens": (True,),
    "guided_json": (), "guided_regex": (), "guided_choice": (), "guided_grammar": (), "structured_outputs": ()}
INT64 = (-2**63, 2**63 - 1)  # vLLM's seed range (torch.long)


class APIError(Exception):
    """An OpenAI-style error: `status`, a message naming the field, the field (`param`), extra headers."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}


@dataclasses.dataclass
class State:
    """What the app serves: set up by the command (`rdpo_jax.serve`), filled in once the model loads."""
    name: str  # the model name clients send (`GET /v1/models`)
    source: str  # the run directory or HF folder
    max_model_len: int | None = None  # prompt + completion tokens at most (set once the model loads)
    max_tokens_default: int = 1024  # a request's max_tokens when it names none (at most what its prompt leaves)
    max_image_pixels: int = 4096 * 4096
    max_image_bytes: int = 32 << 20  # an image's encoded bytes at most (data URL or local file)
    max_request_bytes: int = 64 << 20  # a request body's bytes at most
    allowed_local_media_path: str | None = None  # the only directory local images are read from (None: none)
    max_n: int = 8
    engine: engine_lib.Engine | None = None  # None while loading
    load_error: str | None = None
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))


def json_body(raw: bytes) -> Any:
    """The body as strict JSON (Python's parser would accept NaN and Infinity, which pass every range check)."""
    def constant(name):
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(raw, parse_constant=constant)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise APIError(400, f"the request body is not valid JSON ({e})") from None


def _number(body: dict, key: str, default, low, high, *, integer=False, low_open=False):
    value = body.get(key)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise APIError(400, f"{key}: expected {'an integer' if integer else 'a number'}, got {json.dumps(value)}", key)
    if isinstance(value, float) and not math.isfinite(value):  # JSON has no Infinity, but 1e400 parses as one
        raise APIError(400, f"{key}: {value} is not a finite number", key)
    if value < low or (low_open and value == low) or (high is not None and value > high):
        bounds = f"{'(' if low_open else '['}{low}, {high if high is not None else '∞'}]"
        raise APIError(400, f"{key}: {value} is outside {bounds}", key)
    return value


def _local_file(url: str, path: str, where: str, state: State) -> bytes:
    """A local image's bytes, read only from a regular file whose real path (links and `..` resolved) lies
    under `--allowed_local_media_path`. Missing, outside the root, not a regular file, unreadable: one
    message, so that a client learns nothing about files it may not read."""
    root = state.allowed_local_media_path
    if root is None:
        raise APIError(400, f"{where}: this server reads no local image paths (its operator can allow a directory "
                            "with --allowed_local_media_path=DIR); send a data URL (data:image/png;base64,…)", where)
    refused = APIError(400, f"{where}: no readable image file at {url!r} under this server's allowed local media path",
                       where)
    real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        raise refused
    try:  # O_NONBLOCK: opening a FIFO must not wait for a writer; the fstat below refuses it
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        raise refused from None
    try:
        info = os.fstat(fd)  # of what was opened, not of what the path named a moment before
        if not stat.S_ISREG(info.st_mode):
            raise refused
        if info.st_size > state.max_image_bytes:
            raise APIError(413, f"{where}: the image file has {info.st_size} bytes, over this server's limit of "
                                f"{state.max_image_bytes} (--max_image_bytes)", where)
        data = b""
        while len(data) <= state.max_image_bytes:  # one byte more than the cap: a file grown since is still caught
            chunk = os.read(fd, state.max_image_bytes + 1 - len(data))
            if not chunk:
                break
            data += chunk
    except OSError:
        raise refused from None
    finally:
        os.close(fd)
    return data


def _image_bytes(url: Any, where: str, state: State) -> bytes:
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
        data = _local_file(url, path, where, state)
    if len(data) > state.max_image_bytes:
        raise APIError(413, f"{where}: the image has {len(data)} bytes, over this server's limit of "
                            f"{state.max_image_bytes} (--max_image_bytes)", where)
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Exception as e:  # PIL raises many exception types for bad input
        raise APIError(400, f"{where}: not an image ({type(e).__name__})", where) from None
    if width * height > state.max_image_pixels:
        raise APIError(413, f"{where}: the image has {width}×{height} = {width * height} pixels, over this server's "
                            f"budget of {state.max_image_pixels} (--max_image_pixels)", where)
    return data


def _messages(body: dict, state: State) -> tuple[list[dict], list[bytes]]:
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
                blobs.append(_image_bytes(url, f"{at}.image_url.url", state))
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
    for key, off in UNSUPPORTED.items():
        value = body.get(key)
        if value is not None and not any(type(value) is type(o) and value == o or  # True is not 1
                                         isinstance(value, float) and value == o for o in off):
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
    fields = {"temperature": float(_number(body, "temperature", 1.0, 0.0, 2.0)),
              "top_p": float(_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)),
              # OpenAI's ranges; vLLM's repetition_penalty is any positive factor
              "presence_penalty": float(_number(body, "presence_penalty", 0.0, -2.0, 2.0)),
              "frequency_penalty": float(_number(body, "frequency_penalty", 0.0, -2.0, 2.0)),
              "repetition_penalty": float(_number(body, "repetition_penalty", 1.0, 0.0, None, low_open=True))}
    n = _number(body, "n", 1, 1, state.max_n, integer=True)
    seed = _number(body, "seed", None, *INT64, integer=True)
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise APIError(400, "ignore_eos: expected true or false", "ignore_eos")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, None, 1, None, integer=True)

    messages, blobs = _messages(body, state)
    policy = state.engine.policy
    try:
        prompt = policy.tokenizer.encode(messages, blobs, policy.image_input)
    except images.ImageBudgetError as e:
        raise APIError(413 if e.reason == "image_budget" else 400, f"messages: {e}", "messages") from None
    except images.ImageError as e:
        raise APIError(400, f"messages: image {getattr(e, 'index', '?')}: {e}", "messages") from None
    except TemplateError as e:
        raise APIError(400, f"messages: {e}", "messages") from None
    limit, used = state.max_model_len, len(prompt.ids)
    if used >= limit:  # vLLM's checks and words, so clients that parse them keep working
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your request has "
                            f"{used} input tokens. Please reduce the length of the input messages.", "messages")
    if max_tokens is None:
        max_tokens = min(state.max_tokens_default, limit - used)
    elif used + max_tokens > limit:
        raise APIError(400, f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's "
                            f"maximum context length is {limit} tokens and your request has {used} input tokens "
                            f"({max_tokens} > {limit} - {used}).", key)
    settings = policy.sampling_config(max_new_tokens=max_tokens, num_samples=n, ignore_eos=ignore_eos, **fields)
    request = engine_lib.Request(prompt=prompt, sampling=settings, seed=seed, stop=tuple(stop), stream=stream)
    return request, {"stream": stream, "include_usage": bool(options.get("include_usage"))}
