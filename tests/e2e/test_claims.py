"""Each setting and API rule the README and docs/RELIABILITY.md promise, proven against a real server as a client
sees it (raw HTTP or the `openai` client), one test per claim."""

from __future__ import annotations

import json
import shutil
import subprocess

import httpx
import openai
import pytest

from tests.e2e.conftest import start_server, stop_server
from tests.helpers import run_cli, wait_for

pytestmark = pytest.mark.e2e

KEYS = ("file-key-one", "file-key-two")
NAME = "claims-model"
ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def claims(q4_bundles, tmp_path_factory):
    """One server with the access and limit settings under test (its bundle has 1024 positions)."""
    tmp = tmp_path_factory.mktemp("claims")
    key_file = tmp / "keys.txt"
    key_file.write_text(f"{KEYS[0]}\n\n   {KEYS[1]}  \n")
    server = start_server(
        q4_bundles("fp32"),
        tmp / "claims.log",
        "--api-key-file",
        str(key_file),
        "--metrics-require-key",
        "true",
        "--cors-origins",
        ORIGIN,
        "--served-model-name",
        NAME,
        "--max-messages",
        "3",
        "--max-prompt-tokens",
        "40",
        "--max-logprobs",
        "3",
        "--max-model-len",
        "1024",
        "--max-num-seqs",
        "4",
    )
    yield server
    stop_server(server)


@pytest.fixture()
def h(claims):
    with httpx.Client(base_url=claims.url, timeout=120, headers={"Authorization": f"Bearer {KEYS[1]}"}) as client:
        yield client


def assert_error(resp: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


def complete(h: httpx.Client, **body) -> dict:
    r = h.post("/v1/completions", json={"model": NAME, **body})
    assert r.status_code == 200, r.text
    return r.json()


def chat(h: httpx.Client, **body) -> httpx.Response:
    return h.post("/v1/chat/completions", json={"model": NAME, **body})


HI = [{"role": "user", "content": "Hello world!"}]


# ---------------------------------------------------------------- access


def test_api_key_file_keys_are_the_only_keys(claims):
    body = {"model": NAME, "prompt": "hi", "max_tokens": 2}
    with httpx.Client(base_url=claims.url, timeout=30) as c:
        for key in KEYS:  # blank lines and surrounding spaces in the file are not keys
            assert c.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}).status_code == 200
        for bad in ("", "Bearer", f"Bearer {KEYS[0]}x", f"Bearer {KEYS[0][:-1]}", f"Basic {KEYS[0]}"):
            assert_error(c.post("/v1/completions", json=body, headers={"Authorization": bad}), 401, "invalid_api_key")
        assert c.get("/health").status_code == 200 and c.get("/ready").status_code == 200


def test_metrics_require_a_key_when_asked(claims):
    with httpx.Client(base_url=claims.url, timeout=30) as c:
        assert_error(c.get("/metrics"), 401, "invalid_api_key")
        r = c.get("/metrics", headers={"Authorization": f"Bearer {KEYS[0]}"})
        assert r.status_code == 200 and "num_requests_running" in r.text


def test_cors_allows_only_the_listed_origins(claims):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    with httpx.Client(base_url=claims.url, timeout=30) as c:
        ok = c.options("/v1/completions", headers={"Origin": ORIGIN, **preflight})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
        other = c.options("/v1/completions", headers={"Origin": "https://evil.example", **preflight})
        assert "access-control-allow-origin" not in other.headers
        r = c.get("/health", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers
        sdk = {**preflight, "Access-Control-Request-Headers": "authorization,content-type,x-stainless-lang"}
        assert c.options("/v1/chat/completions", headers={"Origin": ORIGIN, **sdk}).status_code == 200
        big = c.post("/v1/completions", content=b"x" * 2_000_000, headers={"Origin": ORIGIN})
        assert big.status_code == 413 and big.headers["access-control-allow-origin"] == ORIGIN


@pytest.mark.parametrize("origins", ["*", f"{ORIGIN},*"])
def test_a_wildcard_cors_origin_is_refused_at_start(q4_bundles, origins):
    bundle = str(q4_bundles("fp32"))
    result = run_cli("service", "--bundle", bundle, "--port", "0", "--cors-origins", origins, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: cors") and "'*' is refused" in result.stderr


def test_served_model_name_is_the_only_model(claims, h):
    assert [m["id"] for m in h.get("/v1/models").json()["data"]] == [NAME]
    assert_error(h.post("/v1/completions", json={"model": "tiny-q4", "prompt": "hi"}), 404, "model_not_found")
    assert complete(h, prompt="hi", max_tokens=1)["model"] == NAME
    c = openai.OpenAI(base_url=claims.v1, api_key=KEYS[0], max_retries=0)
    assert c.chat.completions.create(model=NAME, messages=HI, max_tokens=1).model == NAME


# ---------------------------------------------------------------- request limits and defaults


def test_max_messages(h):
    assert_error(chat(h, messages=HI * 4, max_tokens=1), 400, param="messages")
    r = chat(h, messages=[{"role": "user", "content": "a"}] * 3, max_tokens=1)
    assert r.status_code == 200, r.text


def test_max_prompt_tokens(h):
    assert_error(h.post("/v1/completions", json={"model": NAME, "prompt": [5] * 41}), 400, "prompt_too_long")
    assert complete(h, prompt=[5] * 40, max_tokens=1)["usage"]["prompt_tokens"] == 40


def test_logprobs_are_capped_by_max_logprobs(h):
    assert_error(chat(h, messages=HI, max_tokens=2, logprobs=True, top_logprobs=4), 400, param="top_logprobs")
    assert_error(h.post("/v1/completions", json={"model": NAME, "prompt": "hi", "logprobs": 4}), 400)
    r = chat(h, messages=HI, max_tokens=2, logprobs=True, top_logprobs=3, temperature=0)
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 2 and all(len(item["top_logprobs"]) == 3 for item in content)


def test_chat_without_max_tokens_stops_at_512(h):
    r = chat(h, messages=HI, temperature=0, ignore_eos=True).json()
    assert r["usage"]["completion_tokens"] == 512 and r["choices"][0]["finish_reason"] == "length"
    completion = complete(h, prompt="hi", temperature=0, ignore_eos=True)  # completions: OpenAI's 16
    assert completion["usage"]["completion_tokens"] == 16


def test_max_completion_tokens_bounds_chat_and_wins_over_max_tokens(h):
    r = chat(h, messages=HI, temperature=0, ignore_eos=True, max_completion_tokens=3).json()
    assert r["usage"]["completion_tokens"] == 3 and r["choices"][0]["finish_reason"] == "length"
    r = chat(h, messages=HI, temperature=0, ignore_eos=True, max_completion_tokens=3, max_tokens=10).json()
    assert r["usage"]["completion_tokens"] == 3


def test_presence_penalty_discourages_tokens_already_generated(h):
    body = {"prompt": "The quick brown fox", "max_tokens": 40, "temperature": 0, "ignore_eos": True, "logprobs": 0}
    plain = complete(h, **body)["choices"][0]["logprobs"]["tokens"]
    penalized = complete(h, **body, presence_penalty=2.0)["choices"][0]["logprobs"]["tokens"]
    assert len(set(plain)) < len(plain)  # greedy alone repeats itself on this model
    assert penalized != plain and len(set(penalized)) > len(set(plain))


def test_a_list_of_string_prompts_gets_n_choices_each_in_order(h):
    prompts = ["The quick brown fox", "def add(a, b):"]
    kw = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}
    alone = [complete(h, prompt=p, **kw)["choices"][0]["text"] for p in prompts]
    both = complete(h, prompt=prompts, n=2, **kw)
    assert alone[0] != alone[1]
    assert [c["index"] for c in both["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in both["choices"]] == [alone[0], alone[0], alone[1], alone[1]]
    assert both["usage"]["completion_tokens"] == 32


def test_logprobs_are_the_models_before_temperature_and_penalties(h):
    """The first token's alternatives come from the same logits whatever the sampling settings."""
    kw = {"prompt": "The quick brown fox", "max_tokens": 1, "logprobs": 3}
    tops = [
        complete(h, **kw, **sampling)["choices"][0]["logprobs"]["top_logprobs"][0]
        for sampling in ({"temperature": 0}, {"temperature": 1.8, "seed": 1}, {"temperature": 0.3, "seed": 2})
    ]
    assert tops[0] == tops[1] == tops[2] and len(tops[0]) == 3
    values = list(tops[0].values())
    assert values[0] > values[-1]  # not a flat distribution, which a temperature would leave unchanged


# ---------------------------------------------------------------- the default model's own defaults


def test_omitted_temperature_and_top_p_are_the_models_recommended_ones(default_server):
    """SmolLM2's card recommends temperature 0.2 and top_p 0.9; the bundle records them, requests without them
    get them (same seed: same tokens as asking for them explicitly, other tokens than OpenAI's 1.0)."""
    manifest = json.loads((default_server.bundle / "manifest.json").read_text())
    assert manifest["generation_defaults"] == {"temperature": 0.2, "top_p": 0.9}
    body = {"model": "smollm2-135m", "prompt": "My favourite animal is", "max_tokens": 12, "seed": 4, "logprobs": 0}
    with httpx.Client(base_url=default_server.v1, timeout=120) as c:

        def tokens(**sampling) -> list[str]:
            return c.post("/completions", json={**body, **sampling}).json()["choices"][0]["logprobs"]["tokens"]

        omitted = tokens()
        assert omitted == tokens(temperature=0.2, top_p=0.9)
        assert omitted != tokens(temperature=1.0, top_p=1.0)


def test_min_tokens_holds_back_the_end_of_sequence(default_server):
    question = [{"role": "user", "content": "What is the capital of France?"}]
    body = {"model": "smollm2-135m", "messages": question, "temperature": 0, "max_tokens": 30}
    with httpx.Client(base_url=default_server.v1, timeout=120) as c:
        free = c.post("/chat/completions", json=body).json()
        assert free["choices"][0]["finish_reason"] == "stop" and free["usage"]["completion_tokens"] < 20
        held = c.post("/chat/completions", json={**body, "min_tokens": 20, "max_tokens": 20}).json()
    assert held["choices"][0]["finish_reason"] == "length" and held["usage"]["completion_tokens"] == 20
    assert held["choices"][0]["message"]["content"].startswith(free["choices"][0]["message"]["content"])


# ---------------------------------------------------------------- backpressure


def test_queued_prompt_tokens_bound_and_unready_when_saturated(default_bundle, tmp_path):
    """One slot, held by a long stream of the default model (1000 tokens: the few requests below take a small
    fraction of that even on a fast GPU); prompts then wait, and the waiting prompt tokens are bounded (30).

    The bound is checked before anything else about a request: once saturated, even a request that validation
    would refuse (an unknown token id) is answered 429, not 400."""
    server = start_server(
        default_bundle,
        tmp_path / "saturation.log",
        "--max-num-seqs",
        "1",
        "--max-model-len",
        "1024",
        "--max-waiting-requests",
        "8",
        "--max-queued-prompt-tokens",
        "30",
        "--unready-when-saturated",
        "true",
    )
    long = {"model": "smollm2-135m", "max_tokens": 1000, "ignore_eos": True, "stream": True, "temperature": 0}
    try:
        with (
            httpx.Client(base_url=server.v1, timeout=120) as h,
            h.stream("POST", "/completions", json={**long, "prompt": "hold the slot"}) as holder,
        ):
            assert holder.status_code == 200
            lines = holder.iter_lines()  # kept: a dropped iterator closes the stream, and the server cancels it
            next(line for line in lines if line.startswith("data: "))  # admitted and streaming
            with h.stream("POST", "/completions", json={**long, "prompt": [5] * 20}) as first:
                wait_for(lambda: server.metric("num_requests_waiting") == 1, "the first waiting request")
                assert httpx.get(server.url + "/ready").status_code == 200  # 20 of 30 tokens: not saturated
                over = h.post("/completions", json={**long, "stream": False, "prompt": [5] * 11})
                assert_error(over, 429, "overloaded")
                assert over.headers["retry-after"] == "1" and over.json()["error"]["type"] == "rate_limit_error"
                with h.stream("POST", "/completions", json={**long, "prompt": [5] * 10}) as second:
                    wait_for(lambda: server.metric("num_requests_waiting") == 2, "the second waiting request")
                    assert httpx.get(server.url + "/ready").status_code == 503  # 30 of 30
                    unknown_token = {**long, "stream": False, "prompt": [10**9]}
                    assert_error(h.post("/completions", json=unknown_token), 429, "overloaded")
                    too_many = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "x"}] * 10**4}
                    assert_error(h.post("/chat/completions", json=too_many), 429, "overloaded")
                    # the holder still runs and both still wait: every answer above came while saturated
                    assert server.metric("num_requests_waiting") == 2 and server.metric("num_requests_running") == 1
                    assert second.status_code == 200
                assert first.status_code == 200
        wait_for(lambda: server.metric("num_requests_waiting") == 0, "the abandoned requests to leave the queue")
        assert httpx.get(server.url + "/ready").status_code == 200
        assert_error(httpx.post(server.v1 + "/completions", json={**long, "prompt": [10**9]}), 400)
    finally:
        stop_server(server)


# ---------------------------------------------------------------- the device


def gpu_usable() -> bool:
    smi = shutil.which("nvidia-smi")
    return smi is not None and subprocess.run([smi, "-L"], capture_output=True).returncode == 0


def test_auto_device_takes_a_usable_gpu_or_falls_back_to_cpu_with_a_warning(q4_bundles, tmp_path):
    import onnxruntime

    # the pinned onnxruntime-gpu lists CUDA on every machine, usable or not: the case `auto` must handle
    assert "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    gpu = gpu_usable()
    for variant in ("fp32", "fp16"):
        server = start_server(q4_bundles(variant), tmp_path / f"auto-{variant}.log", "--device", "auto")
        try:
            health = httpx.get(server.url + "/health").json()
            log = server.log.read_text()
            if gpu and variant == "fp16":  # every node on the device, the cache too, and the logits reduced there
                assert health["device"] == "cuda" and health["providers"][0] == "CUDAExecutionProvider"
                assert "logits reduced on cuda" in log
            else:  # no GPU, or fp32 attention that onnxruntime's CUDA provider cannot run: the CPU, said once
                assert "logits reduced" not in log  # --reduce-logits (on by default) does nothing on the CPU
                assert health["device"] == "cpu" and health["providers"] == ["CPUExecutionProvider"]
                warnings = [line for line in log.splitlines() if " WARNING " in line and "CPU" in line]
                assert len(warnings) == 1
                expected = ("serving on the CPU",) if gpu else ("no usable GPU", "falling back to CPU")
                assert any(e in warnings[0] for e in expected), warnings
            body = {"model": "tiny-q4", "prompt": "hi", "max_tokens": 2}
            assert httpx.post(server.v1 + "/completions", json=body, timeout=60).status_code == 200
        finally:
            stop_server(server)


def test_device_cuda_without_a_gpu_is_one_clear_error(q4_bundles, tmp_path):
    fp32 = q4_bundles("fp32")
    result = run_cli("service", "--bundle", str(fp32), "--port", "0", "--device", "cuda", timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [lines[-1]] and lines[0].startswith("error: ")
    if gpu_usable():  # the GPU is there, but an fp32 bundle's attention cannot run on it: refused, not served slowly
        assert "attention is float32" in lines[0] and "--dtype fp16" in lines[0]
    else:
        assert lines[0].startswith("error: --device cuda") and "no usable GPU" in lines[0]
