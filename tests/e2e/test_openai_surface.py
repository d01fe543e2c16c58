"""The OpenAI surface on a real server: streamed and non-streamed answers agree (logprobs, offsets, echo), the
context rules, usage chunks, keep-alives, /tokenize and /detokenize, logit_bias, unsupported fields refused, null
read as the default, OpenAI's no-effect chat fields accepted."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

pytestmark = pytest.mark.e2e

EMOJI = "Write a short poem with emoji 🎉 about the sea:"
EMOJI_IDS = [19161, 253, 1890, 8216, 351, 649, 33777, 15107, 232, 227, 563, 260, 3426, 42]  # SmolLM2's tokenizer


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0, timeout=120)


def joined_logprobs(chunks) -> dict[str, list]:
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for ch in chunks:
        lp = ch.choices[0].logprobs if ch.choices else None
        if lp is not None:
            for key in out:
                out[key] += getattr(lp, key)
    return out


@pytest.mark.parametrize("echo", [False, True])
def test_streamed_logprobs_equal_the_non_streamed_ones_token_for_token(tiny_server, echo):
    """Random tokens of the tiny model split characters, so some tokens' text is held back in the stream."""
    c = client(tiny_server)
    kw = dict(model="tiny", prompt=EMOJI, max_tokens=40, temperature=0.9, seed=11, logprobs=2, echo=echo)
    kw["extra_body"] = {"ignore_eos": True}
    full = c.completions.create(**kw).choices[0]
    chunks = list(c.completions.create(stream=True, **kw))
    streamed = joined_logprobs(chunks)
    expected = full.logprobs.model_dump(include=set(streamed))
    assert len(expected["tokens"]) == 40 + (len(EMOJI_IDS) if echo else 0)
    assert streamed == expected
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == full.text
    offsets = streamed["text_offset"]
    assert offsets == sorted(offsets) and offsets[-1] > 0  # one running offset, not one per chunk


def test_default_max_tokens_shrinks_to_the_room_left(tiny_server):
    """Within 16 tokens of the context a completion without max_tokens is shorter, not refused."""
    ids = list(range(100, 100 + 256 - 5))
    r = httpx.post(
        tiny_server.v1 + "/completions", json={"model": "tiny", "prompt": ids, "ignore_eos": True}, timeout=60
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] == 5 and body["choices"][0]["finish_reason"] == "length"
    full = httpx.post(tiny_server.v1 + "/completions", json={"model": "tiny", "prompt": list(range(100, 356))})
    err = full.json()["error"]
    assert full.status_code == 400 and err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    asked = httpx.post(tiny_server.v1 + "/completions", json={"model": "tiny", "prompt": ids, "max_tokens": 6})
    assert asked.status_code == 400 and asked.json()["error"]["param"] == "max_tokens"


@pytest.mark.parametrize("endpoint", ["completions", "chat/completions"])
def test_include_usage_puts_null_usage_on_every_chunk_but_the_last(tiny_server, endpoint):
    body = {"model": "tiny", "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}
    body |= {"prompt": "hi"} if endpoint == "completions" else {"messages": [{"role": "user", "content": "hi"}]}
    text = httpx.post(f"{tiny_server.v1}/{endpoint}", json=body, timeout=60).text
    chunks = [json.loads(e.removeprefix("data: ")) for e in text.split("\n\n") if e.startswith("data: {")]
    assert len(chunks) >= 3
    assert all("usage" in ch and ch["usage"] is None for ch in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    plain = httpx.post(f"{tiny_server.v1}/{endpoint}", json={**body, "stream_options": None}, timeout=60).text
    assert '"usage"' not in plain


def test_tokenize_and_detokenize(tiny_server):
    with httpx.Client(base_url=tiny_server.url, timeout=30) as h:
        assert h.post("/tokenize", json={"prompt": EMOJI}).json()["tokens"] == EMOJI_IDS
        t = h.post("/tokenize", json={"model": "tiny", "prompt": "Hello world 🎉"}).json()
        assert t["count"] == len(t["tokens"]) > 0 and t["max_model_len"] == 256
        assert h.post("/detokenize", json={"model": "tiny", "tokens": t["tokens"]}).json() == {
            "prompt": "Hello world 🎉"
        }
        chat = h.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
        r = client(tiny_server).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=1
        )
        assert chat["count"] == r.usage.prompt_tokens  # the same rendering as the chat endpoint
        assert h.post("/detokenize", json={"tokens": [10**9]}).status_code == 400
        assert (
            h.post("/tokenize", json={"prompt": "x", "messages": [{"role": "user", "content": "x"}]}).status_code == 400
        )
        assert h.post("/tokenize", json={"model": "nope", "prompt": "x"}).status_code == 404


def test_logit_bias_forces_and_bans_tokens(tiny_server):
    c = client(tiny_server)
    kw = dict(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0.9, seed=3)
    forced = c.completions.create(logit_bias={"42": 100}, **kw, extra_body={"ignore_eos": True})
    assert forced.choices[0].logprobs is None
    ids = httpx.post(tiny_server.url + "/tokenize", json={"prompt": forced.choices[0].text}).json()["tokens"]
    assert (
        set(ids) <= {42}
        or forced.choices[0].text
        == httpx.post(tiny_server.url + "/detokenize", json={"tokens": [42] * 8}).json()["prompt"]
    )
    greedy = dict(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0, logprobs=1)
    first = c.completions.create(**greedy, extra_body={"ignore_eos": True}).choices[0].logprobs
    top = next(iter(first.top_logprobs[0]))
    top_id = httpx.post(tiny_server.url + "/tokenize", json={"prompt": top}).json()["tokens"][0]
    banned = c.completions.create(**greedy, logit_bias={str(top_id): -100}, extra_body={"ignore_eos": True})
    assert banned.choices[0].logprobs.tokens[0] != first.tokens[0]


BAD = [
    ({"logit_bias": {"abc": 1}}, "logit_bias", None),
    ({"logit_bias": {"1": 101}}, "logit_bias", None),
    ({"logit_bias": {"99999999": 1}}, "logit_bias", None),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", None),
    ({"unknown_field": 1}, "unknown_field", "unknown_parameter"),
    ({"suffix": "x"}, "suffix", "unsupported_parameter"),
    ({"best_of": 3}, "best_of", "unsupported_parameter"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", None),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}},
        None,
        "invalid_schema",
    ),
    ({"response_format": {"type": "yaml"}}, None, None),
    ({"stream_options": {"include_usage": True}}, "stream_options", None),
    ({"prompt": [[1, 2]] * 300}, "prompt", None),  # more sequences than the waiting queue holds: never a 429
]
BAD_CHAT = [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "unsupported_parameter"),
    ({"tool_choice": "required"}, "tool_choice", "unsupported_parameter"),
    ({"functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
    (
        {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]},
        "messages",
        "unsupported_parameter",
    ),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, None, None),
    ({"whatever": True}, "whatever", "unknown_parameter"),
    ({"store": True}, "store", "unsupported_parameter"),
    ({"service_tier": "priority"}, "service_tier", "unsupported_parameter"),
    ({"service_tier": "fastest"}, "service_tier", None),
    ({"modalities": ["text", "audio"]}, "modalities", "unsupported_parameter"),
    ({"modalities": []}, "modalities", None),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio", "unsupported_parameter"),
    ({"reasoning_effort": "low"}, "reasoning_effort", "unsupported_parameter"),
    ({"verbosity": "low"}, "verbosity", "unsupported_parameter"),
    ({"web_search_options": {}}, "web_search_options", "unsupported_parameter"),
    ({"metadata": {"k": 1}}, "metadata.k", None),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", None),
    ({"metadata": {"k" * 65: "v"}}, None, None),
    ({"prediction": {"type": "content"}}, "prediction.content", None),
    ({"prediction": {"type": "guess", "content": "x"}}, None, None),
    ({"safety_identifier": "x" * 65}, "safety_identifier", None),
    ({"n": None, "model": None}, "model", None),  # null is a default's, and model has none
    ({"top_logprobs": 2}, "top_logprobs", None),  # without logprobs: true
    (
        {"messages": [{"role": "assistant", "content": "x", "audio": {"id": "audio_1"}}]},
        "messages",
        "unsupported_parameter",
    ),
    (
        {"messages": [{"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}}]},
        "messages",
        "unsupported_parameter",
    ),
]


@pytest.mark.parametrize(("extra", "param", "code"), BAD)
def test_unsupported_and_invalid_fields_are_refused(tiny_server, extra, param, code):
    r = httpx.post(tiny_server.v1 + "/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert param is None or err["param"] == param, err
    assert code is None or err["code"] == code, err


@pytest.mark.parametrize(("extra", "param", "code"), BAD_CHAT)
def test_unsupported_chat_fields_are_refused(tiny_server, extra, param, code):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, **extra}
    r = httpx.post(tiny_server.v1 + "/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert param is None or err["param"] == param, err
    assert code is None or err["code"] == code, err


NULLS = {  # every field with a default, sent as null: OpenAI's API (and vLLM) read that as the default
    "frequency_penalty": None,
    "n": None,
    "presence_penalty": None,
    "stream": None,
    "top_k": None,
    "min_p": None,
    "repetition_penalty": None,
    "min_tokens": None,
    "seed": None,
    "stop": None,
    "logit_bias": None,
    "response_format": None,
    "stream_options": None,
    "user": None,
}


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_null_means_the_default(tiny_server, endpoint):
    if endpoint == "completions":
        path, body, extra = "/completions", {"prompt": EMOJI}, {"echo": None, "logprobs": None, "best_of": None}
    else:
        path, body = "/chat/completions", {"messages": [{"role": "user", "content": EMOJI}]}
        extra = {"logprobs": None, "top_logprobs": None, "max_completion_tokens": None, "store": None}
    body = {"model": "tiny", "max_tokens": 12, "temperature": 0, "ignore_eos": True, **body}

    def answer(r: httpx.Response) -> list:
        assert r.status_code == 200, r.text
        return [c.get("text", c.get("message")) for c in r.json()["choices"]]

    plain = httpx.post(tiny_server.v1 + path, json=body, timeout=60)
    nulls = httpx.post(tiny_server.v1 + path, json={**body, **NULLS, **extra}, timeout=60)
    assert answer(nulls) == answer(plain) and len(answer(plain)) == 1  # n: null is one choice
    assert nulls.headers["content-type"].startswith("application/json")  # stream: null is not streamed
    ids = httpx.post(tiny_server.url + "/tokenize", json={"prompt": "a b", "add_generation_prompt": None})
    assert ids.status_code == 200, ids.text


def test_chat_fields_that_change_nothing_are_accepted(tiny_server):
    """Through the official client: metadata, store false, service tier auto, a predicted output, a prompt cache key,
    a safety identifier and text-only modalities leave the answer as it is."""
    c = client(tiny_server)
    kw = dict(model="tiny", messages=[{"role": "user", "content": EMOJI}], max_tokens=12, temperature=0)
    plain = c.chat.completions.create(**kw, extra_body={"ignore_eos": True}).choices[0].message.content
    given = c.chat.completions.create(
        **kw,
        metadata={"team": "search", "run": "7"},
        store=False,
        service_tier="auto",
        prediction={"type": "content", "content": "The sea"},
        prompt_cache_key="poems",
        safety_identifier="user-42",
        modalities=["text"],
        reasoning_effort=None,
        extra_body={"ignore_eos": True},
    )
    assert given.choices[0].message.content == plain


def test_usage_counts_each_prompt_once_whatever_n(tiny_server):
    body = {"model": "tiny", "prompt": EMOJI, "max_tokens": 3, "n": 3, "ignore_eos": True}
    usage = httpx.post(tiny_server.v1 + "/completions", json=body, timeout=60).json()["usage"]
    cached = usage.pop("prompt_tokens_details")["cached_tokens"]
    assert usage == {"prompt_tokens": len(EMOJI_IDS), "completion_tokens": 9, "total_tokens": len(EMOJI_IDS) + 9}
    assert 0 <= cached <= len(EMOJI_IDS) - 2  # the prefix cache recomputes a prompt's last two tokens at least


def test_a_chat_goes_on_from_the_clients_own_dump_of_the_last_answer(tiny_server):
    """The agent loop's `messages.append(reply.model_dump())`: the dump's null refusal, annotations, audio and
    function_call are accepted and change nothing."""
    c = client(tiny_server)
    messages = [{"role": "user", "content": "Say hi"}]
    reply = c.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    dumped = reply.choices[0].message.model_dump()
    assert {"refusal", "audio", "function_call"} <= set(dumped)
    kw = dict(model="tiny", max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    turn = {"role": "user", "content": "Again"}
    following = c.chat.completions.create(messages=[*messages, dumped, turn], **kw)
    plain = {"role": "assistant", "content": dumped["content"]}
    assert (
        following.choices[0].message.content
        == c.chat.completions.create(messages=[*messages, plain, turn], **kw).choices[0].message.content
    )


def test_logprob_tokens_hold_their_own_bytes_and_offsets_index_the_text(tiny_server):
    """A prompt of token ids with a special token and a character split over two tokens, echoed: each token's offset
    indexes the echoed text, special tokens take no room in it, tokens holding part of a character read `bytes:`;
    chat's `bytes` are each token's own."""
    ids = [1, 6004, 40303, 218, 2162]  # <|im_start|>, "hi", " " + part of "😀", the rest of it, "ptoms"
    body = {"model": "tiny", "prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
    choice = httpx.post(tiny_server.v1 + "/completions", json=body, timeout=60).json()["choices"][0]
    text, lp = choice["text"], choice["logprobs"]
    assert text.startswith("hi 😀ptoms")
    assert lp["tokens"][:2] == ["<|im_start|>", "hi"] and lp["text_offset"][:6] == [0, 0, 2, 3, 4, 9]
    assert lp["tokens"][2] == "bytes: \\xf0\\x9f\\x98" and lp["tokens"][3] == "bytes:\\x80"
    body |= {"prompt": ids[:3], "max_tokens": 12, "ignore_eos": True}  # the prompt ends inside "😀"
    choice = httpx.post(tiny_server.v1 + "/completions", json=body, timeout=60).json()["choices"][0]
    text, lp = choice["text"], choice["logprobs"]
    assert text.startswith("hi ")  # the unfinished character is the completion's: finished by it, or shown as U+FFFD
    specials = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}
    for token, offset in zip(lp["tokens"], lp["text_offset"]):
        if not token.startswith("bytes:") and token not in specials:
            assert text[offset : offset + len(token)] == token, (token, offset, text)
    reply = client(tiny_server).chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "😀"}],
        max_tokens=24,
        logprobs=True,
        top_logprobs=2,
        temperature=1.0,
        seed=5,
    )
    for t in reply.choices[0].logprobs.content:
        for token, raw in [(t.token, bytes(t.bytes)), *((x.token, bytes(x.bytes)) for x in t.top_logprobs)]:
            if token.startswith("bytes:"):
                with pytest.raises(UnicodeDecodeError):
                    raw.decode("utf-8")
            else:
                assert raw.decode("utf-8") == token
