"""Chaos and hostile input against a real server: clients that vanish mid-stream, malformed bodies, huge values."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.helpers import wait_for

pytestmark = pytest.mark.e2e


def stream_text(url: str, body: dict, stop_after: int | None = None) -> str | None:
    """Streams a completion; with `stop_after`, hangs up after that many events (returns None)."""
    text = []
    with httpx.Client(timeout=60) as h, h.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        for i, line in enumerate(r.iter_lines()):
            if stop_after is not None and i >= stop_after:
                return None  # closing the client mid-stream
            if line.startswith('data: {"id"'):
                import json

                choice = json.loads(line[6:])["choices"][0]
                text.append(choice["text"])
    return "".join(text)


def test_a_third_of_32_streams_disconnect_and_nothing_leaks(tiny_server):
    rng = random.Random(7)
    bodies = [
        {"model": "tiny", "prompt": f"story number {i}", "max_tokens": 48, "temperature": 0, "ignore_eos": True}
        for i in range(32)
    ]
    expected = {
        i: httpx.post(tiny_server.v1 + "/completions", json=b, timeout=60).json()["choices"][0]["text"]
        for i, b in enumerate(bodies)
    }
    quitters = set(rng.sample(range(32), 11))
    with ThreadPoolExecutor(32) as pool:
        futures = {
            i: pool.submit(stream_text, tiny_server.url, b, rng.randrange(2, 40) if i in quitters else None)
            for i, b in enumerate(bodies)
        }
        results = {i: f.result(timeout=120) for i, f in futures.items()}
    for i in range(32):
        if i not in quitters:
            assert results[i] == expected[i], i  # survivors are untouched by the others leaving
    wait_for(
        lambda: tiny_server.metric("num_requests_running") == tiny_server.metric("num_requests_waiting") == 0,
        "every sequence to leave the batch and the queue",
    )
    after = httpx.post(tiny_server.v1 + "/completions", json=bodies[0], timeout=60).json()["choices"][0]["text"]
    assert after == expected[0]


HOSTILE = [
    (b'{"model": "tiny", "prompt": "\xff\xfe"}', 400),  # invalid UTF-8
    (b'{"model": "tiny", "prompt": "x", "max_tokens": 1e400}', 400),
    (b'{"model": "tiny", "prompt": "x", "max_tokens": 99999999999999999999999}', 400),
    (b'{"model": "tiny", "prompt": "x", "temperature": Infinity}', 400),
    (b'{"model": "tiny", "prompt": "x", "seed": "seven"}', 400),
    (b'{"model": "tiny", "prompt": "x", "seed": -7, "max_tokens": 2}', 200),  # OpenAI's seeds are signed
    (b'{"model": "tiny", "prompt": "x", "seed": -9223372036854775808, "max_tokens": 2}', 200),
    (b'{"model": "tiny", "prompt": "x", "seed": 9223372036854775808}', 400),  # past a signed 64-bit int
    (b'{"model": "tiny", "prompt": [[]]}', 400),
    (b'{"model": "tiny", "prompt": [-1, 5]}', 400),
    (b'{"model": "tiny", "prompt": [999999999]}', 400),
    (b"[]", 400),
    (b"null", 400),
    (b"", 400),
    (b'{"model": "tiny", "prompt": "x", "logprobs": 1000}', 400),
    (b'{"model": "tiny", "prompt": "x", "stop": ["a", "b", "c", "d", "e", "f", "g", "h", "i"]}', 400),
    (b'{"model": "tiny", "prompt": "x", "max_tokens": 2, "unknown_field": {"nested": [1, 2]}}', 400),  # as OpenAI
    (b'{"model": "tiny", "prompt": "x", "logit_bias": {"1": 1e400}}', 400),
    (b'{"model": "tiny", "prompt": "x", "logit_bias": {"-1": 5}}', 400),
    (b'{"model": "tiny", "prompt": "x", "logit_bias": [1, 2]}', 400),
    (b'{"model": "tiny", "prompt": "x", "logit_bias": {"\u0661": 5}}', 400),  # a non-ASCII digit
    (
        b'{"model": "tiny", "prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"schema": 5}}}',
        400,
    ),
    (
        b'{"model": "tiny", "prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"schema": '
        b'{"$ref": "#/nowhere"}}}}',
        400,
    ),
    (
        b'{"model": "tiny", "prompt": "x", "response_format": {"type": "json_object", "json_schema": null}, '
        b'"max_tokens": 3}',
        200,
    ),
    (b'{"model": "tiny", "prompt": "x", "response_format": "json"}', 400),
    (b'{"model": "tiny", "prompt": "x", "best_of": 0}', 400),
    (b'{"model": "tiny", "prompt": "x", "max_tokens": 2, "stop": []}', 200),
]


def test_hostile_bodies_get_4xx_and_a_concurrent_request_is_unharmed(tiny_server):
    body = {"model": "tiny", "prompt": "steady", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    expected = httpx.post(tiny_server.v1 + "/completions", json=body, timeout=60).json()["choices"][0]["text"]
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("text", stream_text(tiny_server.url, body)))
    t.start()
    with httpx.Client(base_url=tiny_server.v1, timeout=30) as h:
        for raw, status in HOSTILE:
            r = h.post("/completions", content=raw, headers={"content-type": "application/json"})
            assert r.status_code == status, (raw, r.status_code, r.text)
            if status >= 400:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}, raw
        for path, raw in [
            ("/tokenize", b'{"prompt": 5}'),
            ("/tokenize", b'{"messages": [{"role": "nobody"}]}'),
            ("/tokenize", b"{}"),
            ("/detokenize", b'{"tokens": [-1]}'),
            ("/detokenize", b'{"tokens": "abc"}'),
            ("/detokenize", b'{"tokens": [1e400]}'),
        ]:
            r = h.post(tiny_server.url + path, content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}, raw
        big_header = {"X-Filler": "y" * 20_000}
        r = h.get("/v1/models".removeprefix("/v1"), headers=big_header)
        assert r.status_code == 431 and r.json()["error"]["code"] == "headers_too_large"
    t.join(60)
    assert result["text"] == expected
    assert httpx.get(tiny_server.url + "/health").status_code == 200
