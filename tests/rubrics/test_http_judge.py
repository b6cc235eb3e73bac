"""The OpenAI-compatible judge against a real HTTP server on 127.0.0.1 that scripts answers and faults."""

import http.server
import json
import logging
import os
import re
import sys
import threading
import time

import numpy as np
import pytest

from rdpo_jax import testing
from rdpo_jax.data import arrayrecord
from rdpo_jax.rubrics import http as http_judge
from rdpo_jax.rubrics import prompt as judge_prompt
from rdpo_jax.rubrics.judge import Item
from tests import runs

RUBRIC = {"criteria": [
    {"id": "count", "text": "States two circles", "kind": "essential", "weight": 1.0, "scale": "binary"},
    {"id": "style", "text": "Reads well", "kind": "additional", "weight": 0.5, "scale": "1-5"}]}


def _png():
    return testing.png(np.random.default_rng(0), (4, 4))


class Scripted(http.server.BaseHTTPRequestHandler):
    """Behaviour by the answer being graded: good, slow, flaky500, ratelimited, patient, garbled, down,
    malformed, missing, unknown, badscore, prose, preamble, null, nullalways, buggy (see `reply`).
    Requests are logged per answer on the server object, with the models asked for and the first image
    part's data URL prefix (None for a text-only request)."""

    def log_message(self, *args):  # keep test output clean
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/chat/completions":
            self.send_error(404)
            return
        server = self.server
        text = next(p["text"] for p in body["messages"][0]["content"] if p["type"] == "text")
        if "Write a grading rubric" in text:
            return self.rubric(text, len(body["messages"]))
        answer = re.search(r"Answer to grade:\n(.*?)\n\nCriteria", text, re.S).group(1)
        images = [p for p in body["messages"][0]["content"] if p["type"] == "image_url"]
        with server.lock:
            server.log.setdefault(answer, []).append(time.time())
            server.auth.add(self.headers.get("Authorization"))
            server.models.add(body["model"])
            server.images.add(images[0]["image_url"]["url"][:22] if images else None)
            n = len(server.log[answer])
        status, payload, headers = self.reply(answer, n, len(body["messages"]))
        data = json.dumps(payload).encode() if not isinstance(payload, bytes) else payload
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def rubric(self, text, turns):
        """A rubric writer that gets it wrong first (an unknown kind), right when re-asked — unless the
        request says "hopeless"."""
        good = {"criteria": [{"id": "count", "text": "Says two circles", "kind": "essential", "weight": 2,
                              "scale": "binary"},
                             {"id": "style", "text": "Reads well", "kind": "additional", "weight": 1, "scale": "1-5"}]}
        bad = {"criteria": [{"id": "count", "text": "Says two circles", "kind": "must", "weight": 2,
                             "scale": "binary"}]}
        content = json.dumps(bad if turns == 1 or "hopeless" in text else good)
        if "nullfirst" in text:  # no text at first, then the rubric among prose with a stray brace
            content = None if turns == 1 else f"Here it is: {json.dumps(good)} (ids unique }})"
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def reply(self, answer, n, turns):
        good = {"verdicts": [{"id": "count", "score": 1, "reason": "two circles"},
                             {"id": "style", "score": 4, "reason": "clear"}]}
        kind = answer.split()[0]
        if kind == "slow" and n == 1:
            time.sleep(1.5)  # longer than the client's timeout
        if kind == "flaky500" and n == 1:
            return 500, {"error": "boom"}, {}
        if kind == "ratelimited" and n == 1:
            return 429, {"error": "slow down"}, {"Retry-After": "1"}
        if kind == "patient" and n == 1:
            return 429, {"error": "come back in an hour"}, {"Retry-After": "3600"}
        if kind == "garbled" and n == 1:
            return 503, {"error": "busy"}, {"Retry-After": "when I feel like it"}
        if kind == "down":
            return 503, {"error": "down"}, {}
        if kind == "malformed" and turns == 1:
            content = '{"verdicts": [{"id": "count", "score": 1,'  # cut off
        elif kind == "missing":
            content = json.dumps({"verdicts": good["verdicts"][:1]})
        elif kind == "unknown":
            content = json.dumps({"verdicts": good["verdicts"] + [{"id": "bonus", "score": 1, "reason": "x"}]})
        elif kind == "badscore":
            content = json.dumps({"verdicts": [good["verdicts"][0], {"id": "style", "score": 9, "reason": "x"}]})
        elif kind == "prose":  # braces after the JSON
            content = json.dumps(good) + "\nHope this helps {:} (scores as asked})"
        elif kind == "preamble":  # braces before it: not JSON, then an object that is not the verdict
            content = 'Format {id: score}, e.g. {"id": "x", "score": 1}. Mine:\n' + json.dumps(good)
        elif kind == "null" and turns == 1 or kind == "nullalways":
            content = None  # what vLLM sends for a refusal or a tool call
        elif kind == "buggy":
            content = json.dumps(good).replace("clear", "trips the bug")
        else:
            content = "```json\n" + json.dumps(good) + "\n```"
        return 200, {"choices": [{"message": {"role": "assistant", "content": content}}]}, {}


@pytest.fixture()
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    srv.log, srv.auth, srv.models, srv.images, srv.lock = {}, set(), set(), set(), threading.Lock()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()


def _url(server):
    return f"http://127.0.0.1:{server.server_address[1]}/v1"


def _judge(server, cache_path, monkeypatch, model="judge-vlm", **client_args):
    monkeypatch.setenv("JUDGE_KEY", "s3cret-key")
    client = http_judge.ChatClient(_url(server), model, api_key_env="JUDGE_KEY", **{
        "timeout": 0.5, "max_retries": 2, "backoff": 0.05, **client_args})
    return http_judge.OpenAIJudge(client, http_judge.VerdictCache(cache_path), concurrency=4, attempts=2)


KINDS = ["good", "slow", "flaky500", "ratelimited", "malformed", "missing", "unknown", "badscore", "down"]
IMAGE_MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many circles?"}]}]
TEXT_MESSAGES = [{"role": "user", "content": "How many circles are there in a pair?"}]


def _items(kinds=KINDS):
    return [Item(key=k, messages=IMAGE_MESSAGES, images=[_png()], rubric=RUBRIC, answer=f"{k} there are two circles")
            for k in kinds]


def _scored(verdict):
    return verdict.unscorable is None and verdict.scores == [1.0, 4.0]


def test_faults_end_scored_or_unscorable_and_restarts_use_the_cache(server, tmp_path, monkeypatch):
    judge = _judge(server, str(tmp_path / "cache.sqlite"), monkeypatch)
    verdicts = dict(zip(KINDS, judge.judge(_items())))
    for kind in ("good", "slow", "flaky500", "ratelimited", "malformed"):
        assert verdicts[kind].unscorable is None, (kind, verdicts[kind])
        assert verdicts[kind].scores == [1.0, 4.0] and verdicts[kind].reasons == ["two circles", "clear"]
    assert "missing criterion ids ['style']" in verdicts["missing"].unscorable
    assert "unknown criterion id 'bonus'" in verdicts["unknown"].unscorable
    assert "score 9 is not an integer in [1, 5]" in verdicts["badscore"].unscorable
    assert "gave up after 3 attempts (last: HTTP 503)" in verdicts["down"].unscorable
    log = {k.split()[0]: v for k, v in server.log.items()}
    assert len(log["slow"]) == 2 and len(log["flaky500"]) == 2 and len(log["malformed"]) == 2
    assert log["ratelimited"][1] - log["ratelimited"][0] >= 0.95  # waited as Retry-After said
    assert server.auth == {"Bearer s3cret-key"} and server.images == {"data:image/png;base64,"}
    assert not any("s3cret" in (v.unscorable or "") + "".join(v.reasons) for v in verdicts.values())
    assert judge.stats == {"cached": 0, "judged": 5, "unscorable": 4, "reasks": 4, "errors": 0}
    assert judge.client.stats["retry_after"] == 1 and judge.client.stats["retry_after_capped"] == 0

    before = {k: len(v) for k, v in server.log.items()}
    again = _judge(server, str(tmp_path / "cache.sqlite"), monkeypatch)  # a restarted run
    redo = dict(zip(KINDS, again.judge(_items())))
    after = {k: len(v) for k, v in server.log.items()}
    for kind in ("good", "slow", "flaky500", "ratelimited", "malformed"):
        key = next(k for k in after if k.startswith(kind + " "))
        assert after[key] == before[key], kind  # no request for a cached verdict
        assert redo[kind] == verdicts[kind]
    assert again.stats["cached"] == 5 and after[next(k for k in after if k.startswith("down"))] > before[
        next(k for k in before if k.startswith("down"))]  # failures are retried, never cached


def test_refused_request_is_not_retried(server, tmp_path, monkeypatch):
    client = http_judge.ChatClient(f"http://127.0.0.1:{server.server_address[1]}/nowhere", "m", max_retries=3)
    with pytest.raises(http_judge.EndpointError, match="HTTP 404"):
        client.complete([{"role": "user", "content": "hi"}])
    assert client.stats["requests"] == 1


def test_rubric_writer_is_validated_and_reasked(server):
    from rdpo_jax.rubrics import generate

    client = http_judge.ChatClient(f"http://127.0.0.1:{server.server_address[1]}/v1", "writer", max_retries=0)
    writer = generate.OpenAIRubricGenerator(client, attempts=2)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many circles?"}]}]
    rubric = writer.generate(messages, [_png()], reference="two")
    assert [c["kind"] for c in rubric["criteria"]] == ["essential", "additional"]
    hopeless = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hopeless"}]}]
    with pytest.raises(generate.RubricGenerationError, match="criteria\\[0\\].kind.*'must'"):
        writer.generate(hopeless, [_png()])
    assert client.stats["requests"] == 4  # two attempts each, the first re-asked once
    nullfirst = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "nullfirst"}]}]
    assert [c["id"] for c in writer.generate(nullfirst, [_png()])["criteria"]] == ["count", "style"]
    assert client.stats["requests"] == 6


def test_replies_with_braces_around_the_json_null_content_and_text_only_items(server, tmp_path, monkeypatch):
    judge = _judge(server, str(tmp_path / "cache.sqlite"), monkeypatch)
    text_only = Item("text", TEXT_MESSAGES, [], RUBRIC, "good answer without an image")
    verdicts = dict(zip(["prose", "preamble", "null", "nullalways", "text"],
                        judge.judge(_items(["prose", "preamble", "null", "nullalways"]) + [text_only])))
    for kind in ("prose", "preamble", "null", "text"):
        assert _scored(verdicts[kind]), (kind, verdicts[kind])
    # null content is an invalid reply: re-asked, and unscorable with the reason once attempts run out
    assert verdicts["nullalways"].unscorable == (
        "invalid verdict after 2 attempts: the reply has no text content (null)")
    log = {k.split()[0]: v for k, v in server.log.items()}
    assert len(log["null"]) == 2 and len(log["nullalways"]) == 2 and len(log["prose"]) == 1
    assert server.images == {"data:image/png;base64,", None}  # None: the text-only request had no image part
    assert judge.stats == {"cached": 0, "judged": 4, "unscorable": 1, "reasks": 2, "errors": 0}


def test_an_unexpected_error_fails_its_own_item_counted_and_logged(server, tmp_path, monkeypatch, caplog):
    parse = http_judge.parse_verdict

    def buggy_parse(text, rubric):  # a programming error that only some replies reach
        if "trips the bug" in text:
            raise ZeroDivisionError("division by zero")
        return parse(text, rubric)

    monkeypatch.setattr(http_judge, "parse_verdict", buggy_parse)
    judge = _judge(server, str(tmp_path / "cache.sqlite"), monkeypatch)
    with caplog.at_level(logging.ERROR, logger=http_judge.__name__):
        verdicts = judge.judge(_items(["buggy", "good", "buggy again"]))
    assert _scored(verdicts[1])
    assert verdicts[0].unscorable == verdicts[2].unscorable == "internal error: ZeroDivisionError: division by zero"
    assert judge.stats == {"cached": 0, "judged": 1, "unscorable": 2, "reasks": 0, "errors": 2}
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "ZeroDivisionError" in caplog.text  # the first of its kind, not every one


def test_retry_after_is_capped_and_counted(server, tmp_path, monkeypatch):
    judge = _judge(server, str(tmp_path / "cache.sqlite"), monkeypatch, max_retry_after=0.3)
    start = time.time()
    verdicts = judge.judge(_items(["patient", "garbled"]))
    assert time.time() - start < 10  # the server asked for an hour
    assert all(_scored(v) for v in verdicts), verdicts
    log = {k.split()[0]: v for k, v in server.log.items()}
    assert 0.25 <= log["patient"][1] - log["patient"][0] < 5  # waited the cap, not the hour
    # a Retry-After that is neither seconds nor a date is ignored (the backoff applies), never an error
    assert len(log["garbled"]) == 2
    assert judge.client.stats == {"requests": 4, "retries": 2, "retry_after": 1, "retry_after_capped": 1}


def test_a_changed_judge_model_or_prompt_version_misses_the_cache(server, tmp_path, monkeypatch):
    path = str(tmp_path / "cache.sqlite")
    item = _items(["good"])[0]

    def requests(**judge_args):
        verdict = _judge(server, path, monkeypatch, **judge_args).judge([item])[0]
        assert _scored(verdict)
        return len(server.log[item.answer])

    assert requests() == 1 and requests() == 1  # the same judge again: from the cache
    assert requests(model="judge-vlm-v2") == 2 and server.models == {"judge-vlm", "judge-vlm-v2"}
    monkeypatch.setattr(judge_prompt, "PROMPT_VERSION", judge_prompt.PROMPT_VERSION + "-next")
    assert requests() == 3  # a new prompt version: asked again
    assert requests() == 3


def test_judge_command_caches_per_shard_and_passes_max_retry_after(server, tmp_path):
    pool = [{"prompt_id": "image", "images": [_png()], "messages": IMAGE_MESSAGES, "rubric": RUBRIC},
            {"prompt_id": "text", "images": [], "messages": TEXT_MESSAGES, "rubric": RUBRIC}]
    answers = ["good one", "patient one", "good two", "good text-only"]  # shard 1 of 2 judges batches 1 and 3
    samples = [{"prompt_id": "text" if "text" in a else "image", "sample_id": f"s{i}", "response": a,
                "policy_step": 0, "sampler": {}} for i, a in enumerate(answers)]
    arrayrecord.write(str(tmp_path), "pool", "rubric_pool", pool)
    arrayrecord.write(str(tmp_path), "samples", "samples", samples)
    out = tmp_path / "out"
    proc = runs.run([sys.executable, "-m", "data_prep.judge", f"--pool={tmp_path}/pool",
                     f"--samples={tmp_path}/samples", "--judge=openai", f"--endpoint={_url(server)}",
                     "--judge_model=judge-vlm", f"--out={out}", "--shard_index=1", "--num_shards=2", "--batch_size=1",
                     "--max_retry_after=0.2"], dict(os.environ, PYTHONPATH=runs.ROOT), timeout=120)
    assert "scored: 2" in proc.stdout and "retry_after_capped: 1" in proc.stdout, proc.stdout
    assert sorted(p.name for p in out.glob("*.sqlite")) == ["judged-s00001-of-00002.cache.sqlite"]
    assert set(server.log) == {"patient one", "good text-only"}
