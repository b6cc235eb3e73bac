"""`python -m rdpo_jax.serve` over real HTTP on 127.0.0.1, with the official `openai` client."""

import base64
import concurrent.futures
import http.client
import io
import json
import os
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
    random model writes no valid verdict, so each is counted unscorable with its reason, after re-asks). The
    commands run in the test process (`runs.call`: the devices and XLA flags of the server's process)."""
    out, model = str(tmp_path / "round"), f"{smoke_dir}/model"
    runs.call("data_prep.build_rubrics", f"--input={runs.prompts_jsonl(tmp_path, 4)}", f"--out={out}")
    runs.call("data_prep.sample", f"--pool={out}/pool", f"--model={model}", "--n=1", "--temperature=0",
              "--max_new_tokens=10", "--batch_size=4", f"--out={out}", compile_cache=compile_cache)
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
    log = runs.call("data_prep.judge", f"--pool={out}/pool", f"--samples={out}/samples", f"--out={out}",
                    "--judge=openai", f"--endpoint={served.url}/v1", "--judge_model=model", "--max_tokens=8",
                    "--concurrency=4")
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
    # usage counts the tokens up to the one that completes the stop string, not the rest of the decode chunk:
    # the greedy text of that many tokens holds the stop string, one token fewer does not
    k = stopped.usage.completion_tokens

    def first(tokens):
        return served.client.chat.completions.create(model="model", messages=prompts[1], max_tokens=tokens,
                                                     temperature=0).choices[0].message.content

    assert k < 12 and cut in first(k) and cut not in first(k - 1), (k, together[1])


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
     400, "messages[0].content[0].image_url.url", "--allowed_local_media_path"),
    ({"messages": [{"role": "user", "content": "hi"}], "seed": 2**63}, 400, "seed",
     "outside [-9223372036854775808, 9223372036854775807]"),
    ({"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 2.5}, 400, "presence_penalty",
     "outside [-2.0, 2.0]"),
    ({"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": 0}, 400, "repetition_penalty",
     "outside (0.0, ∞]"),
    ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"5": 3}}, 400, "logit_bias", "not supported"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_k": 5}, 400, "top_k", "not supported"),
    ({"messages": [{"role": "user", "content": "hi"}], "min_p": 0.1}, 400, "min_p", "not supported"),
    ({"messages": [{"role": "user", "content": "hi"}], "best_of": 3}, 400, "best_of", "not supported"),
    ({"messages": [{"role": "user", "content": "hi"}], "skip_special_tokens": False}, 400, "skip_special_tokens",
     "not supported"),
    ({"messages": [{"role": "user", "content": "hi"}], "guided_choice": ["a"]}, 400, "guided_choice", "not supported"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": 1}, 400, "logprobs", "not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]}, 400, "messages[0].content[0]",
     "expected a text part or an image_url part"),
])
def test_bad_requests_get_their_status_and_name_the_field(served, body, status, param, message):
    code, reply, _ = _post(served.url + "/v1/chat/completions", body)
    assert code == status and reply["error"]["param"] == param and reply["error"]["code"] == status
    assert message in reply["error"]["message"], reply


def test_server_basics_models_routes_and_loading(served):
    assert served.before and all(s == 503 and r == "5" and "loading" in b["error"]["message"] for s, b, r in served.before)
    status, models, _ = _get(served.url + "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["model"] and models["data"][0]["max_model_len"] == 512
    assert [m.id for m in served.client.models.list()] == ["model"]
    assert _post(served.url + "/v1/chat/completions", b"{not json")[0] == 400
    status, reply, _ = _post(served.url + "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], '
                                                                  b'"temperature": NaN}')
    assert status == 400 and "NaN" in reply["error"]["message"]  # Python's json would let NaN through every bound
    status, reply, _ = _post(served.url + "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], '
                                                                  b'"repetition_penalty": 1e400}')
    assert status == 400 and reply["error"]["param"] == "repetition_penalty"  # 1e400 parses as inf, no bound catches
    status, reply, _ = _get(served.url + "/v1/nothing")
    assert status == 404 and reply["error"]["code"] == 404
    with pytest.raises(openai.BadRequestError, match="temperature"):
        served.client.chat.completions.create(model="model", messages=[{"role": "user", "content": "hi"}],
                                              temperature=-1)


def test_a_bad_request_batched_with_good_ones_fails_alone(served):
    """Requests sent together share a batch; one whose seed overflows int64 gets its 400 naming the seed, and
    the others their 200 and the answers they get alone (before, the overflow failed the batch: 500 for all)."""
    good = {"messages": [{"role": "user", "content": "describe the image shape"}], "max_tokens": 12, "temperature": 0}
    alone = _post(served.url + "/v1/chat/completions", good)[1]["choices"][0]["message"]["content"]
    # the third names unsupported fields at the values that ask for nothing (what vLLM clients send): answered
    neutral = dict(good, top_k=-1, min_p=0.0, best_of=1, skip_special_tokens=True, logprobs=False, stop_token_ids=[])
    bodies = [good, dict(good, seed=2**63, temperature=1.0), neutral, dict(good, seed=-2**63 - 1, temperature=1.0)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda b: _post(served.url + "/v1/chat/completions", b), bodies))
    assert [r[0] for r in replies] == [200, 400, 200, 400], replies
    assert [r[1]["choices"][0]["message"]["content"] for r in replies[::2]] == [alone, alone]
    assert all(r[1]["error"]["param"] == "seed" for r in replies[1::2])


def test_a_client_that_closes_its_connection_stops_its_rows(served):
    """A non-streaming client that goes away mid-answer: its rows stop at the next decode chunk (the engine
    counts them cancelled and decodes far fewer than the 480 tokens asked for)."""
    before = _get(served.url + "/health")[1]
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 480, "temperature": 0,
                       "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", served.port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        served.wait_running()
    deadline = time.time() + 30
    while (health := _get(served.url + "/health")[1])["running"] or health["batches"] == before["batches"]:
        assert time.time() < deadline, "the rows kept decoding"
        time.sleep(0.02)
    assert health["tokens"] - before["tokens"] < 240, health["tokens"] - before["tokens"]
    assert health["cancelled"] == before["cancelled"] + 1


def _reference_greedy(model, prompt: list[int], max_tokens: int, stop_ids, suppress: int, presence=0.0,
                      frequency=0.0, repetition=1.0) -> list[int]:
    """Greedy ids of `prompt` under the penalties, recomputed step by step from transformers' logits (the
    PyTorch model of the served folder): its RepetitionPenaltyLogitsProcessor over prompt + generated ids
    (vLLM's repetition_penalty), then OpenAI's presence and frequency penalties over the generated ids, in
    numpy; `suppress` (the image placeholder) is never picked, as the server never emits it."""
    import torch
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    out = []
    while len(out) < max_tokens and not (out and out[-1] in stop_ids):
        ids = torch.tensor([prompt + out])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, -1].float()
        logits = RepetitionPenaltyLogitsProcessor(repetition)(ids, logits)[0].numpy()
        counts = np.bincount(np.asarray(out, np.int64), minlength=logits.shape[-1]).astype(np.float32)
        logits = logits - np.float32(frequency) * counts - np.float32(presence) * (counts > 0)
        logits[suppress] = -np.inf
        out.append(int(np.argmax(logits)))
    return out


def test_penalties_equal_a_reference_computation_on_the_models_logits(served, smoke_dir):
    """presence_penalty, frequency_penalty (OpenAI: generated tokens) and repetition_penalty (vLLM: prompt and
    generated tokens), per row in one batch with an unpenalized row: each greedy answer is the one recomputed
    step by step from transformers' logits, each penalty changes the answer, the unpenalized row is unchanged."""
    import torch
    import transformers

    from rdpo_jax.data.tokenize import ChatTokenizer

    messages = [{"role": "user", "content": "describe the image shape shape"}]
    settings = [{}, {"presence_penalty": 2.0}, {"frequency_penalty": 1.5}, {"repetition_penalty": 1.8},
                {"presence_penalty": -1.0, "frequency_penalty": 0.5, "repetition_penalty": 1.3}]

    def ask(extra):
        return served.client.chat.completions.create(model="model", messages=messages, max_tokens=16, temperature=0,
                                                     extra_body=extra if "repetition_penalty" in extra else None,
                                                     **{k: v for k, v in extra.items() if k != "repetition_penalty"})

    with concurrent.futures.ThreadPoolExecutor(len(settings)) as pool:
        replies = list(pool.map(ask, settings))
    folder = f"{smoke_dir}/model"
    with open(f"{folder}/config.json") as f:
        image_token = json.load(f)["image_token_index"]
    tokenizer = ChatTokenizer(folder, image_token_id=image_token)
    model = transformers.AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    prompt, stops = tokenizer.prompt(messages, []), tokenizer.stop_ids()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 80 forwards of a tiny model: threads only add overhead
    try:
        answers = [_reference_greedy(model, prompt, 16, stops, image_token, extra.get("presence_penalty", 0.0),
                                     extra.get("frequency_penalty", 0.0), extra.get("repetition_penalty", 1.0))
                   for extra in settings]
    finally:
        torch.set_num_threads(threads)
    for extra, reply, want in zip(settings, replies, answers):
        body = want[:-1] if want[-1] in stops else want
        assert reply.choices[0].message.content == tokenizer.tokenizer.decode(body, skip_special_tokens=True), extra
        assert reply.usage.completion_tokens == len(want), extra
    assert all(a != answers[0] for a in answers[1:]), answers  # every penalty changed the greedy answer
    alone = served.client.chat.completions.create(model="model", messages=messages, max_tokens=16, temperature=0)
    assert alone.choices[0].message.content == replies[0].choices[0].message.content


# ----- a server with the limits set: local media root, body and image caps, default max_tokens, warm-up -----

@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A media root holding an image, a file over --max_image_bytes, a directory, a FIFO and links out of the
    root; beside it an image outside the root."""
    base = tmp_path_factory.mktemp("media")
    root, outside = base / "root", base / "outside.png"
    root.mkdir()
    (root / "ok.png").write_bytes(_png(20))
    outside.write_bytes(_png(20))
    (root / "big.png").write_bytes(_png(20) + bytes(8192))
    (root / "dir").mkdir()
    os.mkfifo(root / "fifo")
    (root / "link_out.png").symlink_to(outside)
    (root / "link_in.png").symlink_to(root / "ok.png")
    (root / "zero").symlink_to("/dev/zero")
    return root, outside


@pytest.fixture(scope="module")
def limited(smoke_dir, compile_cache, media):
    server = Server(f"{smoke_dir}/model", compile_cache, "--max_queue=2", "--max_image_pixels=1000", "--max_batch=8",
                    f"--allowed_local_media_path={media[0]}", "--max_image_bytes=8000", "--max_request_bytes=65536",
                    "--max_tokens_default=8", "--max_model_len=500", "--warmup")
    yield server
    server.stop()


def _image_request(url, **extra):
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "describe the image"}]}],
            "max_tokens": 6, "temperature": 0, **extra}


def test_local_images_are_read_only_under_the_allowed_root_and_every_refusal_reads_alike(limited, media):
    """--allowed_local_media_path: an image under it is read (plain path, file:// URL, a link inside, `..` that
    stays inside) and answers as the same image sent as a data URL; a missing file, a file outside the root
    (plain, through `..`, through a link), a directory, a FIFO (no blocking) and /dev/zero get one message that
    names only the path sent; a file over --max_image_bytes gets 413; a body over --max_request_bytes gets 413."""
    root, outside = media
    url = limited.url + "/v1/chat/completions"
    data = _post(url, _image_request(_data_url((root / "ok.png").read_bytes())))[1]["choices"][0]["message"]["content"]
    for path in (str(root / "ok.png"), f"file://{root}/ok.png", str(root / "link_in.png"), f"{root}/dir/../ok.png"):
        status, reply, _ = _post(url, _image_request(path))
        assert status == 200 and reply["choices"][0]["message"]["content"] == data, (path, reply)
    refused = [str(root / "missing.png"), str(outside), f"{root}/../outside.png", f"file://{root}/link_out.png",
               str(root / "dir"), str(root / "fifo"), str(root / "zero"), "/etc/passwd", "/dev/zero", "relative.png"]
    messages = set()
    for path in refused:
        t0 = time.time()
        status, reply, _ = _post(url, _image_request(path))
        assert status == 400 and reply["error"]["param"] == "messages[0].content[0].image_url.url", (path, reply)
        assert time.time() - t0 < 10, path
        messages.add(reply["error"]["message"].replace(repr(path), "PATH"))
    assert len(messages) == 1, messages
    status, reply, _ = _post(url, _image_request(str(root / "big.png")))
    assert status == 413 and "--max_image_bytes" in reply["error"]["message"], reply
    status, reply, _ = _post(url, _image_request(_data_url(bytes(70000))))
    assert status == 413 and "--max_request_bytes" in reply["error"]["message"], reply
    connection = http.client.HTTPConnection("127.0.0.1", limited.port, timeout=30)  # chunked: no Content-Length
    connection.request("POST", "/v1/chat/completions", body=iter([b" " * 40000] * 2), encode_chunked=True,
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 413 and "--max_request_bytes" in json.loads(response.read())["error"]["message"]
    connection.close()


def test_max_tokens_default_max_model_len_and_a_bounded_warmed_set_of_compiled_shapes(limited):
    """--max_tokens_default bounds a request that names no max_tokens; above --max_model_len vLLM's errors, word
    for word; --warmup compiles the common buckets before /health turns 200 (a text request in them compiles
    nothing), and prompts in four different --pad_to multiples compile one new shape, not four."""
    url = limited.url + "/v1/chat/completions"
    hi = [{"role": "user", "content": "hi"}]
    status, reply, _ = _post(url, {"messages": hi, "temperature": 0, "ignore_eos": True})
    assert status == 200 and reply["usage"]["completion_tokens"] == 8 and reply["choices"][0]["finish_reason"] == "length"
    n = reply["usage"]["prompt_tokens"]
    status, reply, _ = _post(url, {"messages": hi, "max_tokens": 500})
    assert status == 400 and reply["error"]["param"] == "max_tokens"
    assert reply["error"]["message"] == (f"'max_tokens' or 'max_completion_tokens' is too large: 500. This model's "
                                         f"maximum context length is 500 tokens and your request has {n} input tokens "
                                         f"(500 > 500 - {n}).")
    status, reply, _ = _post(url, {"messages": [{"role": "user", "content": "hi " + "shape " * 494}]})
    assert status == 400 and reply["error"]["message"] == (
        "This model's maximum context length is 500 tokens. However, your request has 500 input tokens. Please "
        "reduce the length of the input messages.")
    assert _get(limited.url + "/v1/models")[1]["data"][0]["max_model_len"] == 500

    health = _get(limited.url + "/health")[1]
    # warm-up: the one rows bucket of --max_batch=8 on 8 devices × (a text prompt, a one-image prompt) × the
    # --max_tokens_default bucket × (greedy, sampled with top-p); the bound: 1 rows × 4 prompt (64…512) × 6
    # new-token (16…512) buckets
    assert health["shapes"] == 4 and health["shape_bound"] == 24, health
    warmed = health["shapes"]
    assert _post(url, {"messages": hi, "temperature": 0})[0] == 200
    assert _post(url, {"messages": hi, "temperature": 0.7, "top_p": 0.9})[0] == 200
    assert _get(limited.url + "/health")[1]["shapes"] == warmed  # requests in warmed buckets compile nothing
    lengths = []
    for words in (254, 324, 394, 474):  # prompts of 260, 330, 400 and 480 tokens
        status, reply, _ = _post(url, {"messages": [{"role": "user", "content": "hi " + "shape " * words}],
                                       "temperature": 0})
        assert status == 200
        lengths.append(reply["usage"]["prompt_tokens"])
    assert len({-(-p // 64) for p in lengths}) == 4, lengths  # four different --pad_to multiples
    assert _get(limited.url + "/health")[1]["shapes"] == warmed + 1


def test_busy_server_answers_429_oversized_images_413_and_sigterm_finishes_requests_in_flight(limited):
    """(Stops the `limited` server: the last test to use it.)"""
    server = limited
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



def test_engine_decodes_qwen_rows_with_images_as_transformers_generate_and_a_bad_row_fails_alone(qwen_smoke_dir):
    """The engine on Qwen2.5-VL (M-RoPE positions, patch buffers; 0, 1 and 2 images of different sizes per
    prompt, in one batch): each greedy answer is transformers' greedy `generate` of its prompt alone (stopping
    at the stop ids, never the image token), the image tokens counted. A request the API would have refused
    (a seed that is no integer) in the same batch gets its error and the others their answers, in that one
    batch."""
    import queue

    import torch
    import transformers

    from rdpo_jax import inference
    from rdpo_jax.serve import engine as engine_lib

    policy = inference.load(f"{qwen_smoke_dir}/model")
    records = [{"messages": p["messages"], "images": p["images"]} for p in arrayrecord.read(f"{qwen_smoke_dir}/pairs")]
    assert {len(r["images"]) for r in records[:7]} == {0, 1, 2}
    settings = policy.sampling_config(max_new_tokens=8, temperature=0.0)
    prompts = [policy.tokenizer.encode(r["messages"], r["images"], policy.image_input) for r in records[:7]]
    theirs = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(f"{qwen_smoke_dir}/model",
                                                                             attn_implementation="eager")
    want = []
    for prompt in prompts:
        ids = torch.tensor(prompt.ids[None], dtype=torch.long)
        kw = {}
        if prompt.images:
            kw = dict(pixel_values=torch.tensor(prompt.images["patches"]),
                      image_grid_thw=torch.tensor(prompt.images["grids"]))
        with torch.no_grad():
            out = theirs.generate(input_ids=ids, mm_token_type_ids=(ids == policy.config.image_token_id).long(),
                                  max_new_tokens=8, do_sample=False, eos_token_id=list(settings.stop_ids),
                                  pad_token_id=settings.pad_id, bad_words_ids=[[policy.config.image_token_id]], **kw)
        generated = out[0, ids.shape[1]:].tolist()
        ends = [k for k, t in enumerate(generated) if t in settings.stop_ids]
        want.append(generated[:ends[0] + 1] if ends else generated)
    served = engine_lib.Engine(policy, max_batch=8)
    served.start()
    events = [queue.Queue() for _ in range(8)]
    requests = [engine_lib.Request(prompt=p, sampling=settings, emit=q.put) for p, q in zip(prompts, events)]
    requests.insert(3, engine_lib.Request(prompt=prompts[0], sampling=settings, seed=0.5, emit=events[7].put))
    try:
        for request in requests:  # all prepared first, so that they arrive within one batch's wait
            served.submit(request)
        for q, ids in zip(events, want):
            got, event = "", q.get(timeout=120)
            while event[0] == "delta":
                got, event = got + event[2], q.get(timeout=120)
            body = ids[:-1] if ids and ids[-1] in settings.stop_ids else ids
            assert event[0] == "done" and got == policy.tokenizer.decode(body) and event[3] == len(ids)
        error = events[7].get(timeout=10)
        assert error[0] == "error" and "TypeError" in error[1], error
    finally:
        served.close()
    assert served.stats["batches"] == 1 and served.stats["rows"] == 7  # one batch, the bad row left out


def test_an_unexpected_failure_is_an_openai_style_500():
    """A bug on the server's side (here an engine that cannot take requests) answers JSON with status 500, as
    every other error does, not a plain-text page that OpenAI clients cannot read."""
    from starlette.testclient import TestClient

    from rdpo_jax.serve import api
    from rdpo_jax.serve.parsing import State

    state = State(name="model", source="nowhere", engine=object())  # has no arrival(): AttributeError inside
    with TestClient(api.create_app(state), raise_server_exceptions=False) as client:
        reply = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 500 and reply.headers["content-type"] == "application/json"
    error = reply.json()["error"]
    assert error["code"] == 500 and error["type"] == "InternalServerError" and "AttributeError" in error["message"]
