"""The automatic prefix cache on a real server: the same answers with and without it (greedy and seeded
sampling), its counters on /metrics, a match that ends inside a 16-token block, and eviction when every slot
is wanted. Two servers on the tiny bundle with two cache slots each, one started with --no-prefix-cache; all of it
twice: on the project's CausalAttention, which reads a shared prefix where it is, and on onnxruntime's own ops
(GroupQueryAttention, as on CUDA), where a cached prefix is copied into the slot that reuses it."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.conftest import Server, start_server, stop_server
from tests.helpers import needs_kernels

SYSTEM = list(range(300, 340))  # a 40-token "system prompt" shared by several requests
SAMPLED = {"temperature": 0.9, "top_p": 0.95, "seed": 7}


@pytest.fixture(
    scope="module",
    params=[pytest.param("tiny_bundle", marks=needs_kernels), "tiny_bundle_onnxruntime"],  # unbuilt: "copies" alone
    ids=["shares", "copies"],
)
def servers(request, tmp_path_factory) -> Iterator[tuple[Server, Server, bool]]:
    """(with the cache, without it, whether the graph reads shared prefixes where they are)"""
    bundle = request.getfixturevalue(request.param)
    logs = tmp_path_factory.mktemp("prefix-logs")
    args = ("--max-model-len", "256", "--max-num-seqs", "2")
    on = start_server(bundle, logs / "on.log", *args)
    off = start_server(bundle, logs / "off.log", *args, "--no-prefix-cache")
    shares = json.loads((bundle / "manifest.json").read_text())["graph"]["cache"].get("rows_addressed", False)
    assert shares == (request.param == "tiny_bundle")  # where ortkernels/ is built, as make test builds it
    yield on, off, shares
    stop_server(on)
    stop_server(off)


CACHED: list[int] = []  # usage.prompt_tokens_details.cached_tokens of each completion, in order


def complete(server: Server, prompt: list[int], **params) -> tuple[str, list[str]]:
    """The completion's text and its tokens (from the logprobs object)."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True, "logprobs": 0}
    r = httpx.post(server.v1 + "/completions", json={**body, **params}, timeout=60)
    assert r.status_code == 200, r.text
    CACHED.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
    choice = r.json()["choices"][0]
    return choice["text"], choice["logprobs"]["tokens"]


def counters(server: Server) -> tuple[float, float]:
    return server.metric("prefix_cache_queries_total"), server.metric("prefix_cache_hits_total")


def test_answers_are_the_same_with_and_without_the_cache_and_hits_are_counted(servers):
    on, off, _ = servers
    q0, h0 = counters(on)
    first = SYSTEM + [401, 402, 403]
    assert complete(on, first) == complete(off, first)
    q1, h1 = counters(on)
    assert q1 - q0 == len(first) and h1 == h0  # nothing cached yet

    second = SYSTEM + [501, 502]  # the same system prompt, another user turn
    assert complete(on, second) == complete(off, second)
    q2, h2 = counters(on)
    assert q2 - q1 == len(second) and h2 - h1 == len(SYSTEM)
    assert CACHED[-2:] == [len(SYSTEM), 0]  # the usage says so too; the server without the cache: none

    # a multi-turn chat resends its history: the previous prompt and answer, then a new turn
    text = complete(on, second)[0]
    answer = httpx.post(on.url + "/tokenize", json={"model": "tiny", "prompt": text}).json()["tokens"]
    turn = second + answer + [601]
    h_before = counters(on)[1]
    assert complete(on, turn, **SAMPLED) == complete(off, turn, **SAMPLED)
    assert counters(on)[1] - h_before >= len(second)


def test_a_match_that_ends_inside_a_block_is_reused(servers):
    on, off, _ = servers
    base = list(range(900, 950))
    complete(on, base)
    partial = base[:21] + [77, 78, 79]  # shares 21 tokens: one full block of 16 and 5 of the next
    h = counters(on)[1]
    assert complete(on, partial, **SAMPLED) == complete(off, partial, **SAMPLED)
    assert counters(on)[1] - h == 21


def test_least_recently_used_entry_is_evicted_when_every_slot_is_wanted(servers):
    on, off, _ = servers
    a, b, c = ([k] * 30 + list(range(k, k + 10)) for k in (1000, 2000, 3000))
    for p in (a, b, c):  # two slots: c takes the slot of a, the least recently used
        assert complete(on, p) == complete(off, p)
    h = counters(on)[1]
    assert complete(on, a) == complete(off, a)
    assert counters(on)[1] == h  # a was evicted
    h = counters(on)[1]
    assert complete(on, c, **SAMPLED) == complete(off, c, **SAMPLED)
    assert counters(on)[1] - h == len(c) - 2  # c is still cached: all but the last two prompt tokens are reused


def test_a_prefix_a_running_request_holds_is_reused_while_it_runs(servers):
    """b arrives while a (the same system prompt) is still generating: on CausalAttention b reads those positions
    from a's row (the server's prefix_cache_shared_positions gauge counts them while b's slot keeps them), on
    GroupQueryAttention they are copied from a's running slot into b's (the gauge stays 0); either way b answers as
    without the cache, and a's stream is undisturbed."""
    on, off, shares = servers
    a, b = SYSTEM + [701, 702, 703], SYSTEM + [801, 802]
    body = {"model": "tiny", "prompt": a, "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True}
    streamed = []
    with httpx.stream("POST", on.v1 + "/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for line in lines:  # a's first token: a is decoding
            if line.startswith("data: {"):
                streamed.append(json.loads(line[6:])["choices"][0]["text"])
                break
        answer_b = complete(on, b)  # admitted while a runs
        for line in lines:
            if line.startswith("data: {"):
                streamed.append(json.loads(line[6:])["choices"][0]["text"])
    assert CACHED[-1] == len(SYSTEM)
    assert on.metric("prefix_cache_shared_positions") == (len(SYSTEM) if shares else 0)  # b's slot still reads a's row
    assert answer_b == complete(off, b)
    assert "".join(streamed) == complete(off, a, max_tokens=200)[0]
