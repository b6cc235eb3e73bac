"""Serve a checkpoint over the OpenAI chat completions API: `python -m rdpo_jax.serve --model=…`.

`api.py` is the HTTP side (Starlette app, request validation, OpenAI-style responses and errors,
server-sent events), `engine.py` the model side (batching of concurrent requests, prefill and chunked
decoding with the KV cache), `__main__.py` the command (flags, loading, uvicorn).
"""
