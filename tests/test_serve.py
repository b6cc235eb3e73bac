"""`python -m rdpo_jax.serve` over real HTTP on 127.0.0.1, with the official `openai` client."""

import base64
import concurrent.futures
import io
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest
from PIL import Image

from rdpo_jax.data import arrayrecord
from tests import runs


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


def _post(url, body: bytes | dict):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


class Server:
    """A serve process; `start` waits until /health answers 200 and records the statuses it saw before."""

    def __init__(self, model, cache, *args):
        self.port = _port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "rdpo_jax.serve", f"--model={model}",
                                      f"--port={self.port}", *args], cwd=runs.ROOT, env=runs.env(cache),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.before = []  # (status, body, Retry-After) of /health before it was ready
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, self.proc.stdout.read()
            try:
                status, body, headers = _get(self.url + "/health")
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.05)
                continue
            if status == 200:
                break
            self.before.append((status, body, headers.get("Retry-After")))
            time.sleep(0.05)
        else:
            raise AssertionError("the server did not get ready")
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0)

    def wait_running(self, rows: int = 1):
        """Until the engine decodes a batch of at least `rows` rows."""
        deadline = time.time() + 60
        while _get(self.url + "/health")[1]["running"] < rows:
            assert time.time() < deadline, "no batch started"
            time.sleep(0.01)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)


@pytest.fixture(scope="module")
def served(smoke_dir, compile_cache):
    server = Server(f"{smoke_dir}/model", compile_cache)
    yield server
    server.stop()


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _png(size) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(size).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _openai_messages(record) -> list[dict]:
    """A pool record's messages as an OpenAI client sends them (its images as data URLs, in order)."""
    blobs, out = iter(record["images"]), []
    for m in record["messages"]:
        content = m["content"]
        if isinstance(content, list):
            content = [{"type": "image_url", "image_url": {"url": _data_url(next(blobs))}} if p["type"] == "image"
                       else p for p in content]
        out.append({"role": m["role"], "content": content})
    return out


def test_greedy_answers_equal_data_prep_sample_and_the_judge_scores_through_the_server(served, smoke_dir, tmp_path,
                                                                                      compile_cache):
    """Greedy answers over HTTP are `data_prep.sample`'s for the same pool prompts (text and token counts),
    and `data_prep.judge --judge=openai` pointed at the server judges every sample through it (the tiny
    random model writes no valid verdict, so each is counted unscorable with its reason, after re-asks)."""
    out, model, env = str(tmp_path / "round"), f"{smoke_dir}/model", runs.env(compile_cache)
    command = [sys.executable, "-m"]
    runs.run(command + ["rdpo_jax.data_prep.build_rubrics", f"--input={runs.prompts_jsonl(tmp_path, 4)}",
                        f"--out={out}"], env)
    runs.run(command + ["rdpo_jax.data_prep.sample", f"--pool={out}/pool", f"--model={model}", "--n=1",
                        "--temperature=0", "--max_new_tokens=10", "--batch_size=4", f"--out={out}"], env)
    samples = {s["prompt_id"]: s for s in arrayrecord.read(f"{out}/samples")}
    pool = list(arrayrecord.read(f"{out}/pool"))
    assert len(samples) == len(pool) == 4 and all(p["images"] for p in pool)
    for record in pool:
        reply = served.client.chat.completions.create(model="model", messages=_openai_messages(record),
                                                      max_tokens=10, temperature=0)
        want = samples[record["prompt_id"]]
        assert reply.choices[0].message.content.strip() == want["response"]
        assert reply.usage.completion_tokens == len(want["response_ids"])
        assert reply.choices[0].finish_reason == ("stop" if len(want["response_ids"]) < 10 else "length")

    before = _get(served.url + "/health")[1]["rows"]
    log = runs.run(command + ["rdpo_jax.data_prep.judge", f"--pool={out}/pool", f"--samples={out}/samples",
                              f"--out={out}", "--judge=openai", f"--endpoint={served.url}/v1", "--judge_model=model",
                              "--max_tokens=8", "--concurrency=4"], env).stdout
    judged = list(arrayrecord.read(f"{out}/judged"))
    assert len(judged) == 4 and all(j["judge"] == "openai:model" and j["unscorable"] for j in judged), judged
    assert "unscorable: 4" in log
    assert _get(served.url + "/health")[1]["rows"] >= before + 4  # every sample went through the server


def test_concurrent_requests_batch_together_and_answer_as_alone(served):
    """32 requests from 8 threads (text-only and with images, different lengths) decode in shared batches
    and each gets exactly the greedy answer it gets alone; streaming gives the same text; a seed makes
    sampled choices reproducible and n choices differ."""
    prompts = [[{"role": "user", "content": "describe the image " + "shape " * (i % 5)}] if i % 2 else
               [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(_png(8 + i))}},
                                             {"type": "text", "text": "what colour is it"}]}] for i in range(32)]

    def ask(messages):
        return served.client.chat.completions.create(model="model", messages=messages, max_tokens=12, temperature=0)

    alone = [ask(m).choices[0].message.content for m in prompts[:8]]
    batches = _get(served.url + "/health")[1]["batches"]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = [r.choices[0].message.content for r in pool.map(ask, prompts)]
    assert _get(served.url + "/health")[1]["batches"] - batches < 32  # they shared batches
    assert together[:8] == alone
    assert together == [ask(m).choices[0].message.content for m in prompts]

    stream = served.client.chat.completions.create(model="model", messages=prompts[0], max_tokens=12, temperature=0,
                                                   stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == together[0]
    assert chunks[-1].usage.completion_tokens == ask(prompts[0]).usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")

    def sampled(seed):
        r = served.client.chat.completions.create(model="model", messages=prompts[1], max_tokens=12, temperature=1.0,
                                                  top_p=0.9, n=3, seed=seed)
        return [c.message.content for c in r.choices]

    first = sampled(7)
    assert first == sampled(7) and len(set(first)) > 1 and first != sampled(8)

    cut = together[1].split()[1]  # a word of a greedy answer as stop string: the text ends before it
    stopped = served.client.chat.completions.create(model="model", messages=prompts[1], max_tokens=12, temperature=0,
                                                    stop=[cut])
    assert stopped.choices[0].finish_reason == "stop" and cut not in stopped.choices[0].message.content
    assert together[1].startswith(stopped.choices[0].message.content)


@pytest.mark.parametrize("body,status,param,message", [
    ({"messages": []}, 400, "messages", "non-empty list"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", "expected 'system'"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, 400, "temperature", "outside [0.0, 2.0]"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p", "outside (0.0, 1.0]"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "n", "outside [1, 8]"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}, 400, "max_tokens", "an integer"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 400, "max_tokens",
     "maximum context length is 512 tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, 400, "logprobs", "not supported"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-5"}, 404, "model", "`gpt-5` does not exist"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.org/a.png"}}]}]},
     400, "messages[0].content[0].image_url.url", "downloads nothing"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}]},
     400, "messages[0].content[0].image_url.url", "does not decode"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/no/such.png"}}]}]},
     400, "messages[0].content[0].image_url.url", "cannot read the local image '/no/such.png'"),
    ({"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]}, 400, "messages[0].content[0]",
     "expected a text part or an image_url part"),
])
def test_bad_requests_get_their_status_and_name_the_field(served, body, status, param, message):
    code, reply, _ = _post(served.url + "/v1/chat/completions", body)
    assert code == status and reply["error"]["param"] == param and reply["error"]["code"] == status
    assert message in reply["error"]["message"], reply


def test_server_basics_models_routes_local_files_and_loading(served, tmp_path):
    assert served.before and all(s == 503 and r == "5" and "loading" in b["error"]["message"] for s, b, r in served.before)
    status, models, _ = _get(served.url + "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["model"] and models["data"][0]["max_model_len"] == 512
    assert [m.id for m in served.client.models.list()] == ["model"]
    assert _post(served.url + "/v1/chat/completions", b"{not json")[0] == 400
    status, reply, _ = _get(served.url + "/v1/nothing")
    assert status == 404 and reply["error"]["code"] == 404
    with pytest.raises(openai.BadRequestError, match="temperature"):
        served.client.chat.completions.create(model="model", messages=[{"role": "user", "content": "hi"}],
                                              temperature=-1)
    path = tmp_path / "local.png"
    path.write_bytes(_png(20))
    replies = [served.client.chat.completions.create(
        model="model", max_tokens=6, temperature=0,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                               {"type": "text", "text": "describe the image"}]}])
        for url in (str(path), f"file://{path}", _data_url(path.read_bytes()))]
    assert len({r.choices[0].message.content for r in replies}) == 1  # the same image three ways
    assert replies[0].usage.prompt_tokens > 16  # the image's tokens count


def test_busy_server_answers_429_oversized_images_413_and_sigterm_finishes_requests_in_flight(smoke_dir, compile_cache):
    server = Server(f"{smoke_dir}/model", compile_cache, "--max_queue=2", "--max_image_pixels=1000", "--max_batch=8")
    url = server.url + "/v1/chat/completions"
    try:
        big = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(_png(40))}}]}]}
        status, reply, _ = _post(url, big)
        assert status == 413 and "40×40 = 1600 pixels" in reply["error"]["message"]

        # ignore_eos (vLLM's extension): the long request decodes all its 480 tokens, holding the engine
        long = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 480, "temperature": 0, "ignore_eos": True}
        short = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            busy = pool.submit(_post, url, long)
            server.wait_running()  # then 6 more arrive: 2 wait, 4 are turned away
            rest = [f.result() for f in [pool.submit(_post, url, short) for _ in range(6)]]
            assert busy.result()[0] == 200 and busy.result()[1]["usage"]["completion_tokens"] == 480
        codes = sorted(r[0] for r in rest)
        assert codes.count(429) >= 3 and codes.count(200) >= 1, codes
        assert all(h["Retry-After"] == "1" and "busy" in b["error"]["message"] for s, b, h in rest if s == 429)

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            flying = [pool.submit(_post, url, long) for _ in range(2)]
            server.wait_running(2)
            server.proc.send_signal(signal.SIGTERM)
            done = [f.result() for f in flying]
        assert all(s == 200 and r["usage"]["completion_tokens"] == 480 for s, r, _ in done)
        assert server.proc.wait(60) == -signal.SIGTERM  # after a clean shutdown uvicorn re-raises the signal
        with pytest.raises(urllib.error.URLError):
            _get(server.url + "/health")
    finally:
        server.stop()
    log = server.proc.stdout.read()
    assert "Shutting down" in log and "Finished server process" in log, log[-2000:]



def test_engine_decodes_qwen_rows_with_images_like_the_sampler(qwen_smoke_dir):
    """The engine on Qwen2.5-VL (M-RoPE positions, patch buffers; 0, 1 and 2 images of different sizes per
    prompt, in one batch): greedy answers equal `sampling.answer`'s, the image tokens counted."""
    import queue

    import jax

    from rdpo_jax import inference, sampling
    from rdpo_jax.serve import engine as engine_lib

    policy = inference.load(f"{qwen_smoke_dir}/model")
    records = [{"messages": p["messages"], "images": p["images"]} for p in arrayrecord.read(f"{qwen_smoke_dir}/pairs")]
    assert {len(r["images"]) for r in records} == {0, 1, 2}
    want = sampling.answer(policy, records, policy.sampling_config(max_new_tokens=8, temperature=0.0),
                           jax.random.key(0))
    served = engine_lib.Engine(policy, max_batch=8)
    served.start()
    events = [queue.Queue() for _ in records]
    try:
        for r, q in zip(records, events):
            prepared = policy.image_input.prepare(r["images"])
            prompt = policy.tokenizer.prompt(r["messages"], prepared["tokens"] if prepared else [])
            served.submit(engine_lib.Request(prompt=prompt, images=prepared, max_tokens=8, temperature=0.0,
                                             emit=q.put))
        for q, [(text, ids, _)] in zip(events, want):
            got, event = "", q.get(timeout=120)
            while event[0] == "delta":
                got, event = got + event[2], q.get(timeout=120)
            assert event[0] == "done" and got.strip() == text and event[3] == len(ids)
    finally:
        served.close()
    assert served.stats["batches"] < len(records)  # the prompts shared batches
