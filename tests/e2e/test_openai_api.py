"""The OpenAI-compatible API through the official `openai` client and raw HTTP, against real servers."""

from __future__ import annotations

import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

pytestmark = pytest.mark.e2e

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0, timeout=120)


def test_models_health_ready(default_server):
    c = client(default_server)
    models = c.models.list()
    assert [m.id for m in models.data] == ["smollm2-135m"]
    one = c.models.retrieve("smollm2-135m")  # GET /v1/models/{model}
    assert one.model_dump() == models.data[0].model_dump()
    for hostile in ("gpt-4o", "org/other model", "x" * 3000, "../health", "%00"):
        with pytest.raises(openai.NotFoundError) as lost:
            c.models.retrieve(hostile)
        assert lost.value.body["code"] == "model_not_found" and len(lost.value.body["message"]) < 200
    health = httpx.get(default_server.url + "/health").json()
    assert health["status"] == "ok" and health["device"] in ("cpu", "cuda")
    assert httpx.get(default_server.url + "/ready").status_code == 200


def test_chat_answers_paris_streamed_and_not(default_server):
    c = client(default_server)
    full = c.chat.completions.create(model="smollm2-135m", messages=QUESTION, temperature=0, max_tokens=30)
    assert "Paris" in full.choices[0].message.content and full.object == "chat.completion"
    assert full.choices[0].finish_reason == "stop" and full.usage.completion_tokens > 0
    chunks = list(
        c.chat.completions.create(
            model="smollm2-135m",
            messages=QUESTION,
            temperature=0,
            max_tokens=30,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)


@pytest.fixture(scope="module")
def torch_greedy():
    """Greedy tokens of the torch reference model (the same weights, no onnxruntime involved)."""
    import torch

    from export.checkpoints import build_model, load
    from export.model import KVCache, decode_one_token, prefill

    model = build_model(load("default"))

    def greedy(ids: list[int], steps: int) -> list[int]:
        cache = KVCache(model.config, 1, len(ids) + steps + 1)
        nxt = int(prefill(model, cache, [ids])[0, -1].argmax())
        out, n = [nxt], len(ids)
        for _ in range(steps - 1):
            nxt = int(decode_one_token(model, cache, torch.tensor([nxt]), torch.tensor([n]))[0].argmax())
            out.append(nxt)
            n += 1
        return out

    return greedy


def test_greedy_equals_torch_reference_alone_and_in_a_busy_batch(default_server, torch_greedy):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(default_server.bundle / "tokenizer.json"))
    prompt = "The history of the printing press begins"
    ids = tok.encode(prompt).ids
    expected = tok.decode(torch_greedy(ids, 24), skip_special_tokens=True)
    c = client(default_server)

    def ask(p, n):
        return (
            c.completions.create(
                model="smollm2-135m", prompt=p, max_tokens=n, temperature=0, extra_body={"ignore_eos": True}
            )
            .choices[0]
            .text
        )

    assert ask(ids, 24) == expected
    others = [(" ".join(["word"] * (3 + 9 * i)), 4 + 3 * i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:  # the others in a batch of their own
        alone = list(pool.map(lambda o: ask(*o), others))
    started = [threading.Event() for _ in others]

    def ask_streamed(i: int) -> str:
        prompt, n = others[i]
        chunks = c.completions.create(
            model="smollm2-135m",
            prompt=prompt,
            max_tokens=n,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        text = []
        for chunk in chunks:
            started[i].set()
            text.append(chunk.choices[0].text)
        return "".join(text)

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(ask_streamed, i) for i in range(len(others))]
        assert all(e.wait(120) for e in started)  # every other is running: the probe joins a batch in progress
        probe = pool.submit(ask, ids, 24)
        futures += [pool.submit(ask, o, n) for o, n in others]  # and more join after it
        assert probe.result() == expected
        assert [f.result() for f in futures] == alone + alone  # nobody's tokens depend on the batch


@pytest.mark.parametrize(
    "prompt", ["Write a short poem with emoji 🎉 about the sea:", "用中文写一句话：今天天气", "日本の首都は"]
)
def test_streamed_deltas_concatenate_to_the_full_text(tiny_server, prompt):
    c = client(tiny_server)
    kw = dict(model="tiny", max_tokens=40, temperature=0.9, seed=11, extra_body={"ignore_eos": True})
    full = c.completions.create(prompt=prompt, **kw).choices[0].text
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(prompt=prompt, stream=True, **kw))
    assert streamed == full and "\ufffd" not in full
    chat_kw = dict(
        model="tiny",
        max_tokens=40,
        temperature=0.9,
        seed=5,
        extra_body={"ignore_eos": True},
        messages=[{"role": "user", "content": prompt}],
    )
    chat_full = c.chat.completions.create(**chat_kw).choices[0].message.content
    chat_stream = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(stream=True, **chat_kw))
    assert chat_stream == chat_full


def test_stop_sequence_spanning_tokens(tiny_server):
    c = client(tiny_server)
    kw = dict(model="tiny", prompt="Once upon a time", max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
    first = c.completions.create(logprobs=0, **kw).choices[0]
    text, pieces = first.text, first.logprobs.tokens
    # a stop string made of the end of one token and the start of the next
    k = next(i for i in range(3, len(pieces) - 1) if len(pieces[i]) >= 2 and pieces[i + 1].strip())
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    assert stop in text
    r = c.completions.create(stop=[stop], **kw)
    assert r.choices[0].text == text[: text.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = list(c.completions.create(stop=stop, stream=True, **kw))
    assert "".join(ch.choices[0].text for ch in streamed) == r.choices[0].text


def test_length_n_seed_echo(tiny_server):
    c = client(tiny_server)
    r = c.completions.create(
        model="tiny", prompt="abc", max_tokens=5, n=3, temperature=1.0, seed=3, extra_body={"ignore_eos": True}
    )
    assert sorted(ch.index for ch in r.choices) == [0, 1, 2]
    assert all(ch.finish_reason == "length" for ch in r.choices) and r.usage.completion_tokens == 15
    again = c.completions.create(
        model="tiny", prompt="abc", max_tokens=5, n=3, temperature=1.0, seed=3, extra_body={"ignore_eos": True}
    )
    assert [ch.text for ch in again.choices] == [ch.text for ch in r.choices]
    assert len({ch.text for ch in r.choices}) > 1  # each choice samples from its own stream (seed, i)
    plain = c.completions.create(model="tiny", prompt="Hello there", max_tokens=3, temperature=0)
    echo = c.completions.create(model="tiny", prompt="Hello there", max_tokens=3, echo=True, temperature=0)
    assert echo.choices[0].text == "Hello there" + plain.choices[0].text
    assert r.id.startswith("cmpl-") and r.object == "text_completion"


def test_logprobs_are_valid_and_sorted(tiny_server):
    c = client(tiny_server)
    r = c.completions.create(model="tiny", prompt="Hello", max_tokens=6, logprobs=3, temperature=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        values = list(top.values())
        assert chosen <= 0 and all(v <= 0 for v in values) and values == sorted(values, reverse=True)
        assert math.isclose(chosen, values[0], abs_tol=1e-5)  # greedy picks the most likely token
    chat = c.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=5,
        logprobs=True,
        top_logprobs=4,
        temperature=0.8,
        seed=1,
    )
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens > 0
    for item in chat.choices[0].logprobs.content:
        tops = [t.logprob for t in item.top_logprobs]
        assert len(tops) == 4 and tops == sorted(tops, reverse=True) and item.logprob <= 0
        assert item.logprob <= tops[0] + 1e-6


def test_abandoned_stream_frees_its_slot(tiny_server):
    body = {"model": "tiny", "prompt": "tell me a long story", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=30) as h, h.stream("POST", tiny_server.v1 + "/completions", json=body) as resp:
        lines = resp.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        assert tiny_server.metric("num_requests_running") >= 1
    deadline = time.time() + 10
    while tiny_server.metric("num_requests_running") and time.time() < deadline:
        time.sleep(0.05)
    assert tiny_server.metric("num_requests_running") == 0


BAD = [
    ({"model": "tiny", "prompt": "x" * 5, "max_tokens": 1000}, 400, "context_length_exceeded"),
    ({"model": "tiny", "prompt": list(range(10, 300))}, 400, "context_length_exceeded"),
    ({"model": "nope", "prompt": "x"}, 404, "model_not_found"),
    ({"model": "tiny", "prompt": "x", "temperature": -0.5}, 400, None),
    ({"model": "tiny", "prompt": "x", "top_p": 0}, 400, None),
    ({"model": "tiny", "prompt": "x", "top_p": 1.5}, 400, None),
    ({"model": "tiny", "prompt": "x", "n": 0}, 400, None),
    ({"model": "tiny", "prompt": "x", "n": 1000}, 400, None),
    ({"model": "tiny", "prompt": ""}, 400, None),
    ({"model": "tiny", "prompt": []}, 400, None),
    ({"model": "tiny", "prompt": "x", "max_tokens": "many"}, 400, None),
    ({"model": "tiny", "prompt": 12.5}, 400, None),
    ({"model": "tiny"}, 400, None),
]
BAD_CHAT = [
    ({"model": "tiny", "messages": []}, 400),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ({"model": "tiny", "messages": "hello"}, 400),
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404),
]


def assert_openai_error(resp, status, code=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code:
        assert err["code"] == code


def test_bad_input_gets_openai_errors_and_running_requests_are_undisturbed(tiny_server):
    c = client(tiny_server)
    kw = dict(model="tiny", prompt="steady", max_tokens=60, temperature=0, extra_body={"ignore_eos": True})
    expected = c.completions.create(**kw).choices[0].text
    result = {}
    runner = threading.Thread(target=lambda: result.setdefault("text", c.completions.create(**kw).choices[0].text))
    runner.start()
    with httpx.Client(base_url=tiny_server.v1, timeout=30) as h:
        for body, status, code in BAD:
            assert_openai_error(h.post("/completions", json=body), status, code)
        for body, status in BAD_CHAT:
            assert_openai_error(h.post("/chat/completions", json=body), status)
        assert_openai_error(
            h.post(
                "/completions", content=b'{"model": "tiny", "prompt": ', headers={"content-type": "application/json"}
            ),
            400,
            "invalid_json",
        )
        nan = b'{"model": "tiny", "prompt": "x", "temperature": NaN}'
        assert_openai_error(h.post("/completions", content=nan, headers={"content-type": "application/json"}), 400)
    runner.join(60)
    assert result["text"] == expected


def test_openai_client_raises_typed_errors(tiny_server):
    c = client(tiny_server)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="missing", prompt="x")
    with pytest.raises(openai.BadRequestError) as exc:
        c.completions.create(model="tiny", prompt="x", max_tokens=1000)
    assert exc.value.code == "context_length_exceeded"


def test_raw_sse_format(tiny_server):
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
    r = httpx.post(tiny_server.v1 + "/completions", json=body, timeout=30)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2].removeprefix("data: "))
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 3
