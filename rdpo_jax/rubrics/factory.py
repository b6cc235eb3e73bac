"""`make_judge`: a judge by name (verifier, openai, flax) and its settings, as the judge and evaluate
commands choose one."""

from __future__ import annotations

from rdpo_jax.rubrics.judge import Judge
from rdpo_jax.rubrics.verifier import VerifierJudge


def make_judge(kind: str, *, model: str = "", endpoint: str = "", api_key_env: str = "OPENAI_API_KEY",
               timeout: float = 120.0, concurrency: int = 8, cache: str = "", max_retry_after: float = 60.0,
               mesh: str = "fsdp=-1", max_tokens: int = 0) -> Judge:
    """The judge named `kind`: "verifier"; "openai" (`model` at `endpoint`, verdicts cached in the SQLite
    file `cache`, a server's Retry-After obeyed up to `max_retry_after` seconds); "flax" (`model`: an HF
    folder or run directory, on `mesh`: see `inference.load`). `max_tokens`: the longest verdict reply
    (0: the judge's default, 1024 for openai, 512 for flax)."""
    if kind == "verifier":
        return VerifierJudge()
    if not model:
        raise ValueError(f"judge {kind!r} needs a judge model")
    if kind == "openai":
        from rdpo_jax.rubrics import http

        if not endpoint or not cache:
            raise ValueError("judge 'openai' needs an endpoint and a cache file")
        client = http.ChatClient(endpoint, model, api_key_env=api_key_env, timeout=timeout,
                                 max_retry_after=max_retry_after)
        return http.OpenAIJudge(client, http.VerdictCache(cache), concurrency=concurrency,
                                **({"max_tokens": max_tokens} if max_tokens else {}))
    if kind == "flax":
        from rdpo_jax import inference
        from rdpo_jax.rubrics.local import FlaxJudge

        return FlaxJudge(inference.load(model, mesh=mesh), name=model,
                         **({"max_new_tokens": max_tokens} if max_tokens else {}))
    raise ValueError(f"unknown judge {kind!r}: verifier | openai | flax")
