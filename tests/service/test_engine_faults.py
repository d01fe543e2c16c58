"""Engine faults as an HTTP client sees them: a real uvicorn server in this process on the tiny bundle, with the
fault injected into its real engine (onnxruntime raising) or its engine loop (the loop itself dying), which no
request can provoke from outside."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from service.app import create_app
from service.config import Settings
from tests.helpers import wait_for


@dataclass
class Live:
    app: FastAPI
    url: str

    @property
    def runtime(self):
        return self.app.state.runtime


@pytest.fixture()
def live(tiny_bundle) -> Iterator[Live]:
    settings = Settings(bundle=tiny_bundle, port=0, max_model_len=256, max_num_seqs=2, verify_golden=False)
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 120  # a hang guard only
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield Live(app, f"http://127.0.0.1:{port}")
    server.should_exit = True
    thread.join(30)


BODY = {"model": "tiny", "prompt": "hello", "max_tokens": 8, "ignore_eos": True, "temperature": 0}


def assert_error(resp: httpx.Response, status: int, code: str) -> None:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code and err["type"] == "server_error"


def test_a_failing_step_is_a_500_engine_error_and_the_server_keeps_serving(live):
    engine = live.runtime.engine
    real = engine.forward

    def broken(*args, **kwargs):
        raise RuntimeError("injected onnxruntime failure")

    engine.forward = broken
    with httpx.Client(base_url=live.url, timeout=60) as h:
        assert_error(h.post("/v1/completions", json=BODY), 500, "engine_error")
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        assert_error(h.post("/v1/chat/completions", json=chat), 500, "engine_error")
        stream = h.post("/v1/completions", json={**BODY, "stream": True})
        assert stream.status_code == 200  # the headers went out before the failure: the error is an event
        events = [e.removeprefix("data: ") for e in stream.text.split("\n\n") if e]
        assert '"code": "engine_error"' in events[-2] and events[-1] == "[DONE]"
        assert h.get("/health").status_code == 200 and h.get("/ready").status_code == 200
        engine.forward = real
        ok = h.post("/v1/completions", json=BODY)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 8
    # retired at the end of the step that answered, which may finish just after the response
    wait_for(lambda: live.runtime.scheduler.num_running == 0, "the last sequence to retire")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_engine_loop_fails_its_requests_health_and_readiness(live):
    scheduler = live.runtime.scheduler

    def die() -> None:
        raise SystemExit("the loop itself breaks")  # escapes the per-step handler

    scheduler.step = die
    with httpx.Client(base_url=live.url, timeout=60) as h:
        assert_error(h.post("/v1/completions", json=BODY), 500, "engine_error")  # the request in flight
        assert not scheduler.alive
        health = h.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "engine loop stopped"
        assert h.get("/ready").status_code == 503
        assert_error(h.post("/v1/completions", json=BODY), 503, "engine_unavailable")
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
        assert_error(h.post("/v1/chat/completions", json=chat), 503, "engine_unavailable")
