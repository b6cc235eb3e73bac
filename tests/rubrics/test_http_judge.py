"""The OpenAI-compatible judge against a real HTTP server on 127.0.0.1 that scripts answers and faults."""

import http.server
import io
import json
import re
import threading
import time

import numpy as np
import pytest
from PIL import Image

from rdpo_jax.rubrics import http as http_judge
from rdpo_jax.rubrics.judge import Item

RUBRIC = {"criteria": [
    {"id": "count", "text": "States two circles", "kind": "essential", "weight": 1.0, "scale": "binary"},
    {"id": "style", "text": "Reads well", "kind": "additional", "weight": 0.5, "scale": "1-5"}]}


def _png():
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


class Scripted(http.server.BaseHTTPRequestHandler):
    """Behaviour by the answer being graded: good, slow, flaky500, ratelimited, malformed, missing,
    unknown, down (see `reply`). Requests are logged per answer on the server object."""

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
        else:
            content = "```json\n" + json.dumps(good) + "\n```"
        return 200, {"choices": [{"message": {"role": "assistant", "content": content}}]}, {}


@pytest.fixture()
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    srv.log, srv.auth, srv.images, srv.lock = {}, set(), set(), threading.Lock()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()


def _judge(server, cache_path, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "s3cret-key")
    client = http_judge.ChatClient(f"http://127.0.0.1:{server.server_address[1]}/v1", "judge-vlm",
                                   api_key_env="JUDGE_KEY", timeout=0.5, max_retries=2, backoff=0.05)
    return http_judge.OpenAIJudge(client, http_judge.VerdictCache(cache_path), concurrency=4, attempts=2)


KINDS = ["good", "slow", "flaky500", "ratelimited", "malformed", "missing", "unknown", "badscore", "down"]


def _items():
    return [Item(key=k, messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                   "text": "How many circles?"}]}],
                 images=[_png()], rubric=RUBRIC, answer=f"{k} there are two circles") for k in KINDS]


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
    assert judge.stats == {"cached": 0, "judged": 5, "unscorable": 4, "reasks": 4}

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
