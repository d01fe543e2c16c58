"""POST /v1/inspect against real servers: the shape, the probabilities' invariants, agreement with what the served
graph generates, the encodings, the limits, and a bundle without an inspection graph."""

from __future__ import annotations

import base64
import json
import math
import shutil

import httpx
import numpy as np
import pytest

from tests.e2e.conftest import start_server, stop_server

pytestmark = pytest.mark.e2e
PROMPT = "The quick brown fox jumps over the lazy dog because it wanted to see the river."


def inspect(server, **body) -> httpx.Response:
    return httpx.post(server.v1 + "/inspect", json={"model": "tiny", **body}, timeout=120)


def error(resp: httpx.Response, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if code:
        assert err["code"] == code, err
    return err


def test_shape_and_probabilities(tiny_server):
    r = inspect(tiny_server, prompt=PROMPT, layers=[1, 0], heads=[3, 0, 2], top_k=4)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"model", "tokens", "layers", "next_tokens"} and body["model"] == "tiny"
    T = len(body["tokens"])
    assert T > 10 and all(set(t) == {"id", "text"} for t in body["tokens"])
    assert "".join(t["text"] for t in body["tokens"]) == PROMPT
    assert [layer["layer"] for layer in body["layers"]] == [1, 0]
    for layer in body["layers"]:
        assert [h["head"] for h in layer["heads"]] == [3, 0, 2]
        for h in layer["heads"]:
            a = np.array(h["attention"])
            assert a.shape == (T, T)
            assert (a[np.triu_indices(T, 1)] == 0).all()  # causal: nothing above the diagonal
            assert np.abs(a.sum(1) - 1).max() <= T * 5e-5 + 1e-6  # rows sum to 1, up to the 4-decimal rounding
            assert a.min() >= 0 and a[0, 0] == 1
            assert all(round(v, 4) == v for v in a.ravel())
    assert len(body["next_tokens"]) == T
    for row in body["next_tokens"]:
        probs = [c["prob"] for c in row]
        assert len(row) == 4 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5


def test_next_tokens_are_what_the_served_graph_generates(tiny_server):
    """The inspection graph and the serving graph are one model: the last position's candidates are the
    completion's greedy token and its top logprobs."""
    body = inspect(tiny_server, prompt=PROMPT, top_k=5).json()
    done = httpx.post(
        tiny_server.v1 + "/completions",
        json={"model": "tiny", "prompt": PROMPT, "max_tokens": 1, "temperature": 0, "logprobs": 5},
        timeout=60,
    ).json()
    last = body["next_tokens"][-1]
    top = done["choices"][0]["logprobs"]["top_logprobs"][0]
    assert last[0]["text"] == done["choices"][0]["text"]
    assert {c["text"]: c["prob"] for c in last} == pytest.approx({t: math.exp(lp) for t, lp in top.items()}, abs=1e-4)
    # token ids as the prompt, and messages through the chat template, read the same way as text
    ids = [t["id"] for t in body["tokens"]]
    assert inspect(tiny_server, prompt=ids, top_k=5).json()["next_tokens"] == body["next_tokens"]
    chat = inspect(tiny_server, messages=[{"role": "user", "content": "hello"}], top_k=0).json()
    usage = httpx.post(
        tiny_server.v1 + "/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 1},
        timeout=60,
    ).json()["usage"]
    assert len(chat["tokens"]) == usage["prompt_tokens"] and chat["next_tokens"][0] == []


def test_float16_base64_encoding(tiny_server):
    plain = inspect(tiny_server, prompt=PROMPT, layers=[0], heads=[1]).json()
    packed = inspect(tiny_server, prompt=PROMPT, layers=[0], heads=[1], encoding="float16-base64").json()
    T = len(plain["tokens"])
    matrix = packed["layers"][0]["heads"][0]["attention"]
    a = np.frombuffer(base64.b64decode(matrix), dtype="<f2").reshape(T, T)
    assert np.abs(a - np.array(plain["layers"][0]["heads"][0]["attention"])).max() < 1e-3
    assert packed["next_tokens"] == plain["next_tokens"]


def test_bad_requests_get_openai_errors(tiny_server):
    error(inspect(tiny_server, prompt="x", model="nope"), 404, "model_not_found")
    error(inspect(tiny_server, prompt=[1] * 257), 400, "context_length_exceeded")  # the graph reads 256 at most
    error(inspect(tiny_server), 400)  # neither prompt nor messages
    error(inspect(tiny_server, prompt="x", messages=[{"role": "user", "content": "x"}]), 400)
    error(inspect(tiny_server, prompt=""), 400)
    error(inspect(tiny_server, prompt=[10**9]), 400)
    assert error(inspect(tiny_server, prompt="x", layers=[2]), 400)["param"] == "layers"  # the tiny model has 2
    assert error(inspect(tiny_server, prompt="x", heads=[0, 0]), 400)["param"] == "heads"
    error(inspect(tiny_server, prompt="x", layers=[]), 400)
    error(inspect(tiny_server, prompt="x", top_k=21), 400)
    error(inspect(tiny_server, prompt="x", encoding="float64"), 400)
    assert inspect(tiny_server, prompt=[1] * 256, layers=[0], heads=[0], top_k=0).status_code == 200


def test_bundle_without_an_inspection_graph_still_serves(tiny_bundle, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(tiny_bundle, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["inspect"], manifest["files"]["inspect.onnx"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    (old / "inspect.onnx").unlink()
    server = start_server(old, tmp_path / "old.log", "--max-model-len", "256")
    try:
        err = error(inspect(server, prompt="hi"), 404, "inspection_unavailable")
        assert "export" in err["message"] and err["type"] == "not_found_error"
        done = httpx.post(server.v1 + "/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
        assert done.status_code == 200
        assert httpx.get(server.url + "/inspect").status_code == 200  # the page itself loads (and says why not)
    finally:
        stop_server(server)


def test_default_model_heads_the_docs_describe(default_server):
    """docs: SmolLM2's layer 16 head 0 attends to the previous token, layer 18 head 8 to the first one."""
    body = httpx.post(
        default_server.v1 + "/inspect",
        json={"model": "smollm2-135m", "prompt": PROMPT, "layers": [16, 18], "top_k": 0},
        timeout=120,
    ).json()
    T = len(body["tokens"])
    previous = np.array(body["layers"][0]["heads"][0]["attention"])
    first = np.array(body["layers"][1]["heads"][8]["attention"])
    assert (previous[np.arange(2, T), np.arange(1, T - 1)] > 0.3).mean() > 0.8
    assert first[1:, 0].min() > 0.95
    # all 30 layers x 9 heads of a 256-token prompt is past the response bound: refused, asking for fewer
    too_big = httpx.post(
        default_server.v1 + "/inspect", json={"model": "smollm2-135m", "prompt": [1] * 256}, timeout=120
    )
    error(too_big, 400, "response_too_large")
