"""Access, limits, backpressure, deadlines and draining, against real servers started with those settings."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.e2e.conftest import start_server, stop_server

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
        assert len(made) == 32
        assert h.get("/health", headers={"X-Request-ID": "bad id\twith spaces"}).headers["x-request-id"] != "bad id"
    log = guarded.log.read_text()
    assert "abc-123 GET /health 200" in log and "x" * 50 not in log  # ids are logged, prompts are not


def test_overload_gets_429_quickly_and_accepted_requests_complete(guarded):
    """Capacity: 2 running + 4 waiting. Twelve at once: the excess is refused with Retry-After."""
    auth = {"Authorization": f"Bearer {KEYS[0]}"}
    body = {"model": "tiny", "prompt": "a long one", "max_tokens": 200, "ignore_eos": True}

    def call(_):
        t = time.perf_counter()
        r = httpx.post(guarded.v1 + "/completions", json=body, headers=auth, timeout=120)
        return r, time.perf_counter() - t

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(call, range(12)))
    refused = [(r, t) for r, t in results if r.status_code == 429]
    accepted = [r for r, _ in results if r.status_code == 200]
    assert refused and accepted and len(refused) + len(accepted) == 12
    for r, _ in refused:
        assert r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "rate_limit_error"
    assert all(r.json()["choices"][0]["finish_reason"] == "length" for r in accepted)
    assert max(t for _, t in refused) < 2.0  # refused at once, not after waiting
    assert guarded.metric("num_requests_waiting") == 0 and guarded.metric("num_requests_running") == 0


def test_deadline_ends_a_request_with_a_clear_error(tiny_bundle, tmp_path):
    server = start_server(tiny_bundle, tmp_path / "deadline.log", "--request-timeout", "0.05", "--max-model-len", "256")
    try:
        body = {"model": "tiny", "prompt": "go on", "max_tokens": 240, "ignore_eos": True}
        r = httpx.post(server.v1 + "/completions", json=body, timeout=30)
        assert_error(r, 504, "deadline_exceeded")
        stream = httpx.post(server.v1 + "/completions", json={**body, "stream": True}, timeout=30).text
        assert '"code": "deadline_exceeded"' in stream and stream.rstrip().endswith("data: [DONE]")
        deadline = time.time() + 5
        while server.metric("num_requests_running") and time.time() < deadline:
            time.sleep(0.05)
        assert server.metric("num_requests_running") == 0
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
        "temperature": 0,
    }
    try:
        with httpx.Client(timeout=60) as h, h.stream("POST", server.v1 + "/completions", json=body) as resp:
            lines = resp.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            started = time.time()
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            refused = httpx.post(server.v1 + "/completions", json={**body, "stream": False}, timeout=10)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
            assert httpx.get(server.url + "/ready").status_code == 503
            rest = [first, *(line for line in lines if line)]
        assert rest[-1] == "data: [DONE]"
        text_chunks = [line for line in rest if line.startswith('data: {"id"')]
        assert len(text_chunks) >= 55  # the stream ran to its end (a chunk per token, bar split characters)
        server.process.wait(25)
        assert time.time() - started < 25
        assert server.process.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
    finally:
        if server.process.poll() is None:
            stop_server(server)
