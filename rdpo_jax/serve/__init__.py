"""Serve a checkpoint over the OpenAI chat completions API: `python -m rdpo_jax.serve --model=…`.

`api.py` is the HTTP side (Starlette app, body limit, OpenAI-style responses and errors, server-sent
events, disconnects), `parsing.py` request validation (every field, images and local media, context
length), `engine.py` the model side (batching of concurrent requests, prefill and chunked decoding with
the KV cache, penalties, bounded shapes, warm-up), `__main__.py` the command (flags, loading, uvicorn).
The reference for clients and operators is docs/serve.md.
"""
