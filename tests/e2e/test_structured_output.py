"""Structured output on a real server: response_format json_schema / json_object constrain decoding (llguidance)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

pytestmark = pytest.mark.e2e

NAME = {"type": "string", "minLength": 1, "maxLength": 16}
SCHEMAS = [
    {
        "type": "object",
        "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "city": NAME,
            "weather": {"enum": ["sunny", "rainy", "cloudy", "snowy"]},
            "days": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 31}, "maxItems": 4},
        },
        "required": ["city", "weather", "days"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "author": {
                "type": "object",
                "properties": {"first": NAME, "last": NAME},
                "required": ["first", "last"],
                "additionalProperties": False,
            },
            "tags": {"type": "array", "items": {"enum": ["poem", "story", "essay"]}, "minItems": 1, "maxItems": 3},
            "published": {"type": "boolean"},
        },
        "required": ["author", "tags", "published"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "minItems": 1,
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {"sku": NAME, "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                    "required": ["sku", "qty"],
                    "additionalProperties": False,
                },
            },
            "status": {"enum": ["open", "paid", "shipped"]},
        },
        "required": ["items", "status"],
        "additionalProperties": False,
    },
]
QUESTIONS = [
    "Describe a person as JSON.",
    "Give the weather of a city as JSON.",
    "Describe a piece of writing as JSON.",
    "Describe an order as JSON.",
]


def test_twenty_schema_constrained_requests_all_parse_and_validate(default_server):
    c = openai.OpenAI(base_url=default_server.v1, api_key="x", max_retries=0, timeout=300)

    def ask(i: int) -> tuple[dict, str, str]:
        schema = SCHEMAS[i % len(SCHEMAS)]
        r = c.chat.completions.create(
            model="smollm2-135m",
            messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            temperature=0.8,
            seed=i,
            max_tokens=400,
            response_format={"type": "json_schema", "json_schema": {"name": f"s{i % 4}", "schema": schema}},
        )
        return schema, r.choices[0].message.content, r.choices[0].finish_reason

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(ask, range(20)))
    for schema, text, reason in results:
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), schema)
    assert len({text for _, text, _ in results}) > 4  # sampled, not one canned answer per schema


def test_json_object_mode_and_streaming(default_server):
    c = openai.OpenAI(base_url=default_server.v1, api_key="x", max_retries=0, timeout=300)
    kw = dict(
        model="smollm2-135m",
        messages=[{"role": "user", "content": "Give a person's name and age as a JSON object."}],
        temperature=0.8,
        seed=1,
        max_tokens=300,
        response_format={"type": "json_object"},
    )
    full = c.chat.completions.create(**kw).choices[0]
    assert full.finish_reason == "stop" and isinstance(json.loads(full.message.content), dict)
    streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(stream=True, **kw))
    assert streamed == full.message.content  # the same seed gives the same constrained answer
    plain = c.chat.completions.create(**{**kw, "response_format": {"type": "text"}}).choices[0].message.content
    assert plain != full.message.content


def test_an_invalid_schema_is_a_400(default_server):
    c = openai.OpenAI(base_url=default_server.v1, api_key="x", max_retries=0)
    for schema in ({"type": "nonsense"}, {"type": "object", "properties": {"a": {"$ref": "#/missing"}}}):
        with pytest.raises(openai.BadRequestError) as exc:
            c.chat.completions.create(
                model="smollm2-135m",
                messages=[{"role": "user", "content": "hi"}],
                response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": schema}},
            )
        assert exc.value.code == "invalid_schema"
