"""Serves a training run's latest checkpoint or a Hugging Face folder over the OpenAI chat API.

    python -m rdpo_jax.serve --model=RUN_DIR_OR_HF_FOLDER [--port=8000] [--mesh=fsdp=-1]

`POST /v1/chat/completions` (streaming too) and `GET /v1/models` as vLLM serves them, for evaluation
harnesses (VLMEvalKit, lmms-eval), the `openai` client, or `data_prep.judge --judge=openai`. The server
listens at once and answers 503 until the model has loaded (`GET /health` says when). HTTP is uvicorn
running a Starlette app; SIGTERM (or Ctrl-C) stops accepting connections, finishes the requests in
flight and exits. One process, on its own devices (the mesh splits parameters over them).
"""

from __future__ import annotations

import io
import json
import os
import time

import jax.numpy as jnp
from absl import app, flags
from PIL import Image

from rdpo_jax import inference
from rdpo_jax.data.tokenize import Prompt
from rdpo_jax.models import config as config_lib
from rdpo_jax.serve import api, engine, parsing

_MODEL = flags.DEFINE_string("model", None, "Run directory (its latest checkpoint) or HF folder.", required=True)
_NAME = flags.DEFINE_string("served_model_name", None, "The model name clients send (default: the folder's name).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on.")
_MESH = flags.DEFINE_string("mesh", inference.DEFAULT_MESH, inference.MESH_HELP)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter and compute dtype.")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 32, "Rows (choices) decoded together at most.")
_WAIT_MS = flags.DEFINE_float("batch_wait_ms", 5.0, "How long a batch waits for more requests to join it.")
_MAX_QUEUE = flags.DEFINE_integer("max_queue", 256, "Rows waiting at most; more requests get 429.")
_MAX_N = flags.DEFINE_integer("max_n", 8, "Largest `n` (choices per request).")
_MAX_LEN = flags.DEFINE_integer("max_model_len", 8192, "Prompt + completion tokens at most (vLLM's name; at most the "
                                "model's max_position_embeddings). Every row of a batch holds a KV cache of its prompt "
                                "bucket + new-token bucket, so this bounds a batch's memory.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens_default", 1024, "max_tokens of a request that names none (at most what "
                                   "its prompt leaves of --max_model_len).")
_MAX_PIXELS = flags.DEFINE_integer("max_image_pixels", 4096 * 4096, "Pixels per image at most (413 above).")
_MAX_IMAGE_BYTES = flags.DEFINE_integer("max_image_bytes", 32 << 20, "An image's encoded bytes at most, data URL or "
                                        "local file (413 above).")
_MAX_BODY = flags.DEFINE_integer("max_request_bytes", 64 << 20, "A request body's bytes at most (413 above).")
_MEDIA = flags.DEFINE_string("allowed_local_media_path", None, "The directory local image paths (file://… or plain) "
                             "may be read from, links and '..' resolved (vLLM's name); unset: none are.")
_PAD_TO = flags.DEFINE_integer("pad_to", 64, "The smallest prompt bucket: prompts are left-padded to it times a "
                               "power of two.")
_CHUNK = flags.DEFINE_integer("decode_chunk", 16, "Decode steps per device call (streaming granularity).")
_WARMUP = flags.DEFINE_bool("warmup", False, "Before serving, compile every rows bucket for a text prompt and a "
                            "one-image prompt with --max_tokens_default new tokens, greedy and sampled with top-p.")


def model_max_len(folder: str) -> int:
    """max_position_embeddings of an HF folder's text model (4096 if it names none)."""
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    for section in (config.get("text_config") or {}, config):
        if section.get("max_position_embeddings"):
            return int(section["max_position_embeddings"])
    return 4096


def warmup_prompts(policy) -> list[Prompt]:
    """What `--warmup` compiles for: a short text prompt and, if the model reads images, one with a small image."""
    text = {"type": "text", "text": "Describe the image."}
    prompts = [policy.tokenizer.encode([{"role": "user", "content": [text]}], [], policy.image_input)]
    if policy.image_input.max_images:
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), (128, 128, 128)).save(buffer, "PNG")
        prompts.append(policy.tokenizer.encode([{"role": "user", "content": [{"type": "image"}, text]}],
                                               [buffer.getvalue()], policy.image_input))
    return prompts


def main(argv):
    del argv
    import uvicorn

    source = _MODEL.value.rstrip("/")
    for flag, least in ((_MAX_LEN, 2), (_MAX_TOKENS, 1), (_PAD_TO, 1), (_CHUNK, 1), (_MAX_BATCH, 1),
                        (_MAX_IMAGE_BYTES, 1), (_MAX_BODY, 1)):
        if flag.value < least:
            raise app.UsageError(f"--{flag.name}={flag.value}: expected at least {least}")
    media = _MEDIA.value and os.path.realpath(_MEDIA.value)
    if media and not os.path.isdir(media):
        raise app.UsageError(f"--allowed_local_media_path={_MEDIA.value}: not a directory")
    state = parsing.State(name=_NAME.value or os.path.basename(source), source=source,
                          max_tokens_default=_MAX_TOKENS.value, max_image_pixels=_MAX_PIXELS.value,
                          max_image_bytes=_MAX_IMAGE_BYTES.value, max_request_bytes=_MAX_BODY.value,
                          allowed_local_media_path=media or None, max_n=min(_MAX_N.value, _MAX_BATCH.value))

    def load():
        run = config_lib.RunSettings(param_dtype=jnp.dtype(_DTYPE.value))
        policy = inference.load(source, mesh=_MESH.value, run=run)
        state.max_model_len = min(_MAX_LEN.value, model_max_len(policy.folder))
        served = engine.Engine(policy, max_batch=_MAX_BATCH.value, wait_s=_WAIT_MS.value / 1000,
                               max_queue=_MAX_QUEUE.value, pad_to=_PAD_TO.value, chunk=_CHUNK.value,
                               max_model_len=state.max_model_len)
        if _WARMUP.value:
            t0 = time.perf_counter()
            served.warm_up(warmup_prompts(policy), min(_MAX_TOKENS.value, state.max_model_len - 1))
            print(f"serve: warmed up {served.stats['shapes']} shapes in {time.perf_counter() - t0:.1f}s", flush=True)
        served.start()
        print(f"serve: {source} (step {policy.step}) as {state.name!r} on {policy.mesh.devices.size} devices, "
              f"max_model_len {state.max_model_len}, at most {served.shape_bound} shapes (rows × prompt × new-token "
              f"buckets): ready", flush=True)
        return served

    config = uvicorn.Config(None, host=_HOST.value, port=_PORT.value, log_level="info", timeout_graceful_shutdown=None)
    server = uvicorn.Server(config)

    def failed(error):
        print(f"serve: could not load {source}: {error}", flush=True)
        server.should_exit = True

    def shutdown():
        if state.engine is not None:
            state.engine.close()

    config.app = api.create_app(state, on_startup=lambda: api.load_in_background(state, load, on_error=failed),
                                on_shutdown=shutdown)
    server.run()
    if state.load_error:
        raise SystemExit(1)


if __name__ == "__main__":
    app.run(main)
