"""Access, limits, backpressure, deadlines and draining, against real servers started with those settings."""

from __future__ import annotations

import json
import re
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.e2e.conftest import start_server, stop_server
from tests.helpers import wait_for

pytestmark = pytest.mark.e2e
KEYS = ("key-one", "key-two")


@pytest.fixture(scope="module")
def guarded(tiny_bundle, tmp_path_factory):
    server = start_server(
        tiny_bundle,
        tmp_path_factory.mktemp("logs") / "guarded.log",
        "--api-keys",
        ",".join(KEYS),
        "--max-body-bytes",
        "4096",
        "--max-num-seqs",
        "2",
        "--max-waiting-requests",
        "4",
        "--max-model-len",
        "256",
        "--max-tokens-limit",
        "200",
    )
    yield server
    stop_server(server)


def assert_error(resp: httpx.Response, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if code:
        assert err["code"] == code
    return err


def test_api_keys(guarded):
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    with httpx.Client(base_url=guarded.url, timeout=30) as h:
        assert_error(h.post("/v1/completions", json=body), 401, "invalid_api_key")
        assert_error(h.post("/v1/completions", json=body, headers={"Authorization": "Bearer nope"}), 401)
        assert_error(h.get("/v1/models", headers={"Authorization": "Basic key-one"}), 401)
        assert_error(h.get("/v1/models/tiny", headers={"Authorization": "Bearer nope"}), 401)
        for key in KEYS:
            assert h.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert h.get("/health").status_code == 200 and h.get("/ready").status_code == 200
        assert h.get("/metrics").status_code == 200
    c = openai.OpenAI(base_url=guarded.v1, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        c.models.list()
    assert openai.OpenAI(base_url=guarded.v1, api_key=KEYS[1]).models.list().data[0].id == "tiny"


def test_inspection_is_guarded_like_generation(guarded):
    body = {"model": "tiny", "prompt": "hi", "layers": [0], "heads": [0]}
    auth = {"Authorization": f"Bearer {KEYS[0]}"}
    json_auth = {**auth, "Content-Type": "application/json"}
    with httpx.Client(base_url=guarded.url, timeout=60) as h:
        assert_error(h.post("/v1/inspect", json=body), 401, "invalid_api_key")
        assert_error(h.post("/v1/inspect", json={**body, "prompt": "x" * 5000}, headers=auth), 413, "body_too_large")
        assert_error(h.post("/v1/inspect", json={**body, "prompt": [1] * 300}, headers=auth), 400)  # context 256
        for hostile in ({**body, "layers": [-1]}, {**body, "top_k": 1e9}, {**body, "prompt": [[1]]}, [1, 2], "x"):
            assert_error(h.post("/v1/inspect", json=hostile, headers=auth), 400)
        assert_error(
            h.post("/v1/inspect", content=b'{"model": "tiny", "prompt": ', headers=json_auth), 400, "invalid_json"
        )
        assert h.post("/v1/inspect", json=body, headers=auth).status_code == 200
        assert h.get("/inspect").status_code == 200  # the page is static; its API calls carry the key


def test_body_and_request_limits(guarded):
    auth = {"Authorization": f"Bearer {KEYS[0]}"}
    with httpx.Client(base_url=guarded.url, timeout=30, headers=auth) as h:
        assert_error(h.post("/v1/completions", json={"model": "tiny", "prompt": "x" * 5000}), 413, "body_too_large")
        assert_error(h.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 201}), 400)
        assert h.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 3}).status_code == 200


def test_request_ids_are_echoed_or_made(guarded):
    auth = {"Authorization": f"Bearer {KEYS[0]}"}
    with httpx.Client(base_url=guarded.url, timeout=30, headers=auth) as h:
        assert h.get("/health", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
        made = h.get("/health").headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", made)
        replaced = h.get("/health", headers={"X-Request-ID": "bad id\twith spaces"}).headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", replaced) and replaced != made
        prompt = "a secret prompt 7f3e9c"
        served = h.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0})
        assert served.status_code == 200
        completion = served.json()["choices"][0]["text"]
    # The access line is written once the response has been sent: wait for it rather than race it.
    served_line = f"{served.headers['x-request-id']} POST /v1/completions 200"
    wait_for(lambda: served_line in guarded.log.read_text(), "the completion's access-log line")
    log = guarded.log.read_text()
    assert "abc-123 GET /health 200" in log and f"{replaced} GET /health 200" in log  # ids are logged
    assert "7f3e9c" not in log and (len(completion.strip()) < 4 or completion not in log)  # prompts are not


def test_overload_gets_429_quickly_and_accepted_requests_complete(guarded):
    """Capacity: 2 running + 4 waiting. Twelve at once: the excess is refused with Retry-After."""
    auth = {"Authorization": f"Bearer {KEYS[0]}"}
    body = {"model": "tiny", "prompt": "a long one", "max_tokens": 200, "ignore_eos": True}

    answered = []  # (status, number of accepted requests finished before this answer came)
    lock, start = threading.Lock(), threading.Barrier(12)

    def call(_):
        start.wait()  # all twelve at once
        r = httpx.post(guarded.v1 + "/completions", json=body, headers=auth, timeout=120)
        with lock:
            answered.append((r.status_code, sum(1 for status, _ in answered if status == 200)))
        return r

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(call, range(12)))
    refused = [r for r in results if r.status_code == 429]
    accepted = [r for r in results if r.status_code == 200]
    assert refused and accepted and len(refused) + len(accepted) == 12
    for r in refused:
        err = r.json()["error"]
        assert r.headers["retry-after"] == "1" and err["type"] == "rate_limit_error" and err["code"] == "overloaded"
    assert all(r.json()["choices"][0]["finish_reason"] == "length" for r in accepted)
    # refused at once, not after waiting: every refusal came before the first accepted request finished
    assert all(done == 0 for status, done in answered if status == 429)
    wait_for(lambda: guarded.metric("num_requests_running") == 0, "the accepted requests to retire")
    assert guarded.metric("num_requests_waiting") == 0


def test_deadline_ends_a_request_with_a_clear_error(default_bundle, tmp_path):
    """A 0.05 s deadline against 1000 tokens of the default model: a step costs over a millisecond on any
    machine, so the request cannot finish in time; what is tested is how it ends."""
    server = start_server(
        default_bundle, tmp_path / "deadline.log", "--request-timeout", "0.05", "--max-model-len", "1100"
    )
    try:
        body = {"model": "smollm2-135m", "prompt": "go on", "max_tokens": 1000, "ignore_eos": True}
        r = httpx.post(server.v1 + "/completions", json=body, timeout=60)
        assert_error(r, 504, "deadline_exceeded")
        stream = httpx.post(server.v1 + "/completions", json={**body, "stream": True}, timeout=60).text
        assert '"code": "deadline_exceeded"' in stream and stream.rstrip().endswith("data: [DONE]")
        wait_for(lambda: server.metric("num_requests_running") == 0, "the timed-out sequences to leave the batch")
    finally:
        stop_server(server)


def test_sigterm_drains_running_streams_and_refuses_new_ones(default_bundle, tmp_path):
    server = start_server(default_bundle, tmp_path / "drain.log", "--max-model-len", "512", "--drain-timeout", "20")
    body = {
        "model": "smollm2-135m",
        "prompt": "Tell me a story.",
        "max_tokens": 60,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0,
    }
    try:
        with httpx.Client(timeout=60) as h, h.stream("POST", server.v1 + "/completions", json=body) as resp:
            lines = resp.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            server.process.send_signal(signal.SIGTERM)
            wait_for(lambda: httpx.get(server.url + "/ready").status_code == 503, "the server to start draining")
            refused = httpx.post(server.v1 + "/completions", json={**body, "stream": False}, timeout=10)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
            rest = [first, *(line for line in lines if line)]
        assert rest[-1] == "data: [DONE]"
        usage = json.loads(rest[-2].removeprefix("data: "))["usage"]
        assert usage["completion_tokens"] == 60  # the stream ran to its end
        server.process.wait(60)  # a hang guard: the drain ends when the stream does
        assert server.process.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
    finally:
        if server.process.poll() is None:
            stop_server(server)
