"""A client that hangs up cancels its request, whatever its kind: the slots and cache positions come back, and the
next request gets them. Every wait here is on an event the server exposes (its metrics, its stream)."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Callable
from urllib.parse import urlparse

import httpx
import pytest

from tests.e2e.conftest import Server, start_server, stop_server

pytestmark = pytest.mark.e2e
SLOTS = 2


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    s = start_server(
        tiny_bundle,
        tmp_path_factory.mktemp("logs") / "disconnect.log",
        "--max-num-seqs",
        str(SLOTS),
        "--max-model-len",
        "256",
        "--sse-keepalive",
        "0.05",
    )
    yield s
    stop_server(s)


def metric(server: Server, name: str, **labels: str) -> float:
    """A sample of the server's /metrics, by name and labels (0 when the labelled series does not exist yet)."""
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            if re.match(rf"{name}[{{ ]", line):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def until(condition: Callable[[], bool], what: str, safety: float = 120) -> None:
    """Waits for an event the server reports; `safety` only keeps a broken server from hanging the suite."""
    end = time.monotonic() + safety
    while not condition():
        assert time.monotonic() < end, f"never happened: {what}"
        time.sleep(0.02)


def send(server: Server, path: str, body: dict) -> socket.socket:
    """A request on a raw socket, so the test can hang up whenever it likes."""
    url = urlparse(server.url)
    sock = socket.create_connection((url.hostname, url.port))
    data = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    sock.sendall(head.encode() + data)
    return sock


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    seen = b""
    while marker not in seen:
        more = sock.recv(65536)
        assert more, f"connection closed before {marker!r}: {seen[-500:]!r}"
        seen += more
    return seen


def body_for(endpoint: str, n: int, stream: bool, max_tokens: int = 200) -> dict:
    body = {"model": "tiny", "n": n, "stream": stream, "max_tokens": max_tokens, "ignore_eos": True}
    if endpoint == "completions":
        return {**body, "prompt": "tell me a long story"}
    return {**body, "messages": [{"role": "user", "content": "tell me a long story"}]}


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("endpoint", ["completions", "chat/completions"])
def test_hanging_up_frees_the_slots_and_the_next_request_gets_them(server, endpoint, stream, n):
    aborted = metric(server, "request_success_total", finished_reason="abort")
    sock = send(server, f"/v1/{endpoint}", body_for(endpoint, n, stream))
    # hang up as soon as the request is seen running: the tiny model writes its 200 tokens in ~0.15 s, and a hang-up
    # after the last of them cancels nothing
    if stream:
        read_until(sock, b"data: ")  # the stream has started: its sequences hold their slots and cache positions
    else:

        def running() -> bool:
            return metric(server, "num_requests_running") == n and metric(server, "kv_cache_usage_perc") > 0

        until(running, f"{n} sequences running, holding cache positions")
    sock.close()
    until(
        lambda: metric(server, "request_success_total", finished_reason="abort") == aborted + n,
        "the scheduler retired the cancelled sequences",
    )
    # the abort is counted after the slots were freed, in the same engine step
    assert metric(server, "num_requests_running") == 0 and metric(server, "kv_cache_usage_perc") == 0
    # the next request gets every slot at once (nothing waits behind the abandoned one)
    with (
        httpx.Client(timeout=120) as h,
        h.stream("POST", f"{server.v1}/{endpoint}", json=body_for(endpoint, SLOTS, True, max_tokens=40)) as r,
    ):
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: {"))
        assert metric(server, "num_requests_waiting") == 0
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"


def test_a_queued_stream_gets_keepalives_until_a_slot_frees(server):
    # as long as the context allows (5 prompt + 250 tokens): the slots must stay busy until the waiting stream has
    # had its keep-alive and /metrics has been read; 200 tokens of the tiny model sometimes ended before that
    occupier = send(server, "/v1/completions", body_for("completions", SLOTS, False, max_tokens=250))
    until(lambda: metric(server, "num_requests_running") == SLOTS, "every slot busy")
    with (
        httpx.Client(timeout=120) as h,
        h.stream("POST", f"{server.v1}/completions", json=body_for("completions", 1, True, max_tokens=5)) as r,
    ):
        lines = r.iter_lines()
        first = next(line for line in lines if line)
        assert first == ": keep-alive"  # waiting in the queue, the stream stays warm
        assert metric(server, "num_requests_waiting") == 1
        occupier.close()  # the slots free, the waiting stream is admitted
        data = [line for line in lines if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]" and len(data) >= 2
