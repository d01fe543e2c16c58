"""Validation: one request in, prompt ids and sampling parameters out; every limit and default decided here."""

from __future__ import annotations

import pytest

from service.config import Settings
from service.errors import APIError
from service.grammar import Grammars
from service.protocol import ChatCompletionRequest, CompletionRequest
from service.tokenizer import TextTokenizer
from service.validation import Validator

MAX_LEN = 64


@pytest.fixture(scope="module")
def validator(default_bundle):
    tok = TextTokenizer(default_bundle / "tokenizer.json", None, None, None)
    settings = Settings(bundle=default_bundle, default_max_tokens=20, max_logit_bias=3)
    grammars = Grammars(default_bundle / "tokenizer.json", (2,), tok.vocab_size)
    return Validator(settings, tok, "m", MAX_LEN, {"temperature": 0.2, "top_p": 0.9}, grammars)


def completion(**kw) -> CompletionRequest:
    return CompletionRequest(**{"model": "m", "prompt": [1] * 10, **kw})


def chat(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(**{"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw})


def error(fn, *args) -> APIError:
    with pytest.raises(APIError) as exc:
        fn(*args)
    return exc.value


def test_max_tokens_default_fits_the_room_and_an_explicit_one_must(validator):
    assert validator.completion(completion()).params.max_tokens == 16  # OpenAI's default
    assert validator.completion(completion(prompt=[1] * (MAX_LEN - 5))).params.max_tokens == 5
    err = error(validator.completion, completion(prompt=[1] * (MAX_LEN - 5), max_tokens=6))
    assert (err.code, err.param) == ("context_length_exceeded", "max_tokens")
    err = error(validator.completion, completion(prompt=[1] * MAX_LEN))
    assert (err.code, err.param) == ("context_length_exceeded", "prompt")
    short = validator.chat(chat())
    assert short.params.max_tokens == 20  # --default-max-tokens
    err = error(validator.chat, chat(messages=[{"role": "user", "content": "word " * MAX_LEN}]))
    assert (err.code, err.param) == ("context_length_exceeded", "messages")
    err = error(validator.chat, chat(max_completion_tokens=MAX_LEN))
    assert err.param == "max_completion_tokens"


def test_defaults_come_from_the_bundle_unless_sent(validator):
    p = validator.completion(completion()).params
    assert (p.temperature, p.top_p) == (0.2, 0.9)
    p = validator.completion(completion(temperature=0, top_p=1.0)).params
    assert (p.temperature, p.top_p) == (0, 1.0)


def test_logit_bias(validator):
    assert validator.completion(completion(logit_bias={"7": -100, "3": 5.5})).params.logit_bias == ((3, 5.5), (7, -100))
    for bad in ({"x": 1}, {"-1": 1}, {"١": 1}, {"1": 100.5}, {str(10**9): 1}, {"1": 1, "2": 1, "3": 1, "4": 1}):
        assert error(validator.completion, completion(logit_bias=bad)).param == "logit_bias", bad


def test_response_format(validator):
    assert validator.chat(chat()).params.grammar is None  # unconstrained requests carry no grammar
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    g = validator.chat(chat(response_format=fmt)).params.grammar
    assert g and validator.chat(chat(response_format=fmt)).params.grammar is g  # compiled once
    assert validator.chat(chat(response_format={"type": "json_object"})).params.grammar
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    assert error(validator.chat, chat(response_format=bad)).code == "invalid_schema"


def test_tools_are_refused_not_ignored(validator):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    assert error(validator.chat, chat(tools=tools)).code == "unsupported_parameter"
    assert error(validator.chat, chat(tool_choice="auto")).code == "unsupported_parameter"
    assert validator.chat(chat(tool_choice="none")).n == 1


def test_an_earlier_assistant_message_as_the_openai_client_dumps_it_is_accepted(validator):
    """`messages.append(response.choices[0].message.model_dump())`: refusal, annotations, audio and function_call
    come back as nulls; audio or a function call that is there is refused, not ignored."""
    dumped = {"role": "assistant", "content": "Hello!", "refusal": None, "annotations": [], "audio": None}
    dumped |= {"function_call": None, "tool_calls": None}
    messages = [{"role": "user", "content": "hi"}, dumped, {"role": "user", "content": "and?"}]
    plain = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}, messages[2]]
    assert validator.chat(chat(messages=messages)).prompts == validator.chat(chat(messages=plain)).prompts
    for extra in ({"audio": {"id": "a1"}}, {"function_call": {"name": "f", "arguments": "{}"}}):
        refused = [*messages[:1], {**dumped, **extra}, messages[2]]
        err = error(validator.chat, chat(messages=refused))
        assert (err.code, err.param) == ("unsupported_parameter", "messages")


def test_developer_messages_are_the_system_prompt(validator):
    as_developer = chat(
        messages=[{"role": "developer", "content": "Answer in French."}, {"role": "user", "content": "hi"}]
    )
    as_system = chat(messages=[{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "hi"}])
    assert validator.chat(as_developer).prompts == validator.chat(as_system).prompts


def test_top_logprobs_without_logprobs_is_refused(validator):
    err = error(validator.chat, chat(top_logprobs=3))
    assert (err.status, err.param) == (400, "top_logprobs")
    assert validator.chat(chat(top_logprobs=3, logprobs=True)).params.logprobs == 3


def test_a_request_larger_than_the_waiting_queue_is_a_400_not_a_429(validator):
    room = validator.settings.max_waiting_requests + validator.settings.max_num_seqs
    assert validator.completion(completion(prompt=[[1, 2]] * room)).n == 1
    err = error(validator.completion, completion(prompt=[[1, 2]] * (room // 2 + 1), n=2))
    assert (err.status, err.param) == (400, "prompt")
