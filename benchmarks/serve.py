"""Serving throughput: `python -m rdpo_jax.serve` under 1, 8 and 32 concurrent clients against the
offline sampler (`sampling.answer`, what `data_prep.sample` runs) on the same model and prompts.

    python benchmarks/serve.py [--clients=1,8,32] [--requests=64] [--new_tokens=64] [--rounds=3]

The smoke model's tokenizer and chat template with a wider decoder (Qwen2 4 layers × 256, SigLIP tower
of 16 image tokens) and random weights, saved once as a Hugging Face folder. Every request is one
text-only prompt of ~30 tokens, greedy, exactly --new_tokens tokens (`ignore_eos`, on both sides), so
both sides generate the same tokens. The server runs in its own process on this
machine's one CPU device; the clients are threads of this process sending plain HTTP (urllib, not the
openai client, whose overhead would be charged to the server on these two cores). Per round: the
offline sampler on --max_batch prompts at a time, then each client count; a warm-up first (the server's
`--warmup` with `--max_tokens_default=--new_tokens` compiles every rows bucket it forms, and one
untimed round); medians over --rounds.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import jax
import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data_prep import smoke  # noqa: E402
from rdpo_jax import inference, sampling  # noqa: E402

_CLIENTS = flags.DEFINE_list("clients", ["1", "8", "32"], "Concurrent client counts.")
_REQUESTS = flags.DEFINE_integer("requests", 64, "Requests per client count and round.")
_NEW = flags.DEFINE_integer("new_tokens", 64, "Tokens generated per request.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed rounds (medians reported).")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 32, "The server's --max_batch and the offline batch size.")


def _prompts(n: int) -> list[list[dict]]:
    rng = np.random.default_rng(0)
    words = smoke.WORDS[3:]
    return [[{"role": "user", "content": " ".join(rng.choice(words, 24))}] for _ in range(n)]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as r:
        return json.loads(r.read())


def _serve(url: str, prompts, clients: int) -> tuple[float, int]:
    """(seconds, completion tokens) for all `prompts` sent by `clients` threads, one request at a time each."""
    body = dict(max_tokens=_NEW.value, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        replies = list(pool.map(lambda m: _post(url, dict(body, messages=m)), prompts))
    return time.perf_counter() - t0, sum(r["usage"]["completion_tokens"] for r in replies)


def main(argv):
    del argv
    folder = os.path.join(tempfile.mkdtemp(), "model")
    smoke.write_model(folder, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                      max_position_embeddings=1024)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    server = subprocess.Popen([sys.executable, "-m", "rdpo_jax.serve", f"--model={folder}", f"--port={port}",
                               f"--max_batch={_MAX_BATCH.value}", "--max_queue=1024", "--mesh=data=1", "--warmup",
                               f"--max_tokens_default={_NEW.value}"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        policy = inference.load(folder, mesh="data=1")
        prompts = _prompts(_REQUESTS.value)
        cfg = policy.sampling_config(max_new_tokens=_NEW.value, temperature=0.0, ignore_eos=True)
        records = [{"messages": m, "images": []} for m in prompts]
        B = _MAX_BATCH.value

        def offline() -> tuple[float, int]:
            t0 = time.perf_counter()
            for i in range(0, len(records), B):
                sampling.answer(policy, records[i:i + B], cfg, jax.random.key(0))
            return time.perf_counter() - t0, len(records) * _NEW.value

        clients = [int(c) for c in _CLIENTS.value]
        # The server compiled every rows bucket before /health turned 200 (--warmup); round 0 below runs every
        # variant once more, untimed (the offline batch compiles there).
        results: dict[str, list[tuple[float, int]]] = {}
        for round_ in range(_ROUNDS.value + 1):  # round 0 warms up
            for name, fn in [("offline", offline)] + [(f"{c} clients", lambda c=c: _serve(
                    url + "/v1/chat/completions", prompts, c)) for c in clients]:
                seconds, tokens = fn()
                if round_:
                    results.setdefault(name, []).append((seconds, tokens))
                    print(f"round {round_} {name}: {tokens / seconds:.0f} tokens/s", flush=True)
    finally:
        server.terminate()
        server.wait(60)

    offline_rate = statistics.median(t / s for s, t in results["offline"])
    print(f"\n{_REQUESTS.value} requests of {_NEW.value} tokens, medians of {_ROUNDS.value} rounds "
          f"(jax {jax.__version__}, {jax.devices()[0].device_kind}):\n")
    print("| clients | requests/s | tokens/s | of offline tokens/s |")
    print("| --- | --- | --- | --- |")
    print(f"| offline sampler (batches of {B}) | {statistics.median(len(prompts) / s for s, _ in results['offline']):.2f} "
          f"| {offline_rate:.0f} | 100% |")
    for c in clients:
        runs = results[f"{c} clients"]
        rate = statistics.median(t / s for s, t in runs)
        print(f"| {c} | {statistics.median(len(prompts) / s for s, _ in runs):.2f} | {rate:.0f} | "
              f"{100 * rate / offline_rate:.0f}% |")


if __name__ == "__main__":
    app.run(main)
