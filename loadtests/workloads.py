"""The benchmark's workloads, shared by our HTTP client and the peers (no project imports: peers run it too)."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable

PROMPT_TOKENS = 128
OUTPUT_TOKENS = 128
W1_REPEATS = 5
W2_STREAMS = 16
W3_REQUESTS, W3_RUNNING = 64, 16
# W4, a chat service: 16 users at once, each sending CHAT_ROUNDS requests one after another, every one the same
# 1,000-token system prompt plus a 32-token user turn of its own, 64 tokens answered.
CHAT_USERS, CHAT_ROUNDS, CHAT_SYSTEM_TOKENS, CHAT_TURN_TOKENS, CHAT_OUTPUT_TOKENS = 16, 4, 1000, 32, 64


def chat_prompt(user: int, round_: int, system: int = CHAT_SYSTEM_TOKENS, turn: int = CHAT_TURN_TOKENS) -> list[int]:
    return prompt(-1, system) + prompt(5000 + 100 * user + round_, turn)


def prompt(i: int, n: int = PROMPT_TOKENS) -> list[int]:
    """Token ids from the common part of the vocabulary, distinct per i."""
    rng = random.Random(1000 + i)
    return [rng.randrange(300, 20000) for _ in range(n)]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def stalls(gaps: list[float]) -> int:
    """How many inter-token gaps were over 3x the median one: the stalls a p99 lands on once they pass 1%."""
    if not gaps:
        return 0
    bound = 3 * median(gaps)
    return sum(g > bound for g in gaps)


def static_w3(run_batch: Callable[[list[list[int]]], object]) -> dict:
    """W3 for a static-batching peer: 64 requests as 4 batches of 16, one after another."""
    ends, t0 = [], time.perf_counter()
    for b in range(0, W3_REQUESTS, W3_RUNNING):
        run_batch([prompt(200 + i) for i in range(b, b + W3_RUNNING)])
        ends += [time.perf_counter() - t0] * W3_RUNNING
    nan = float("nan")
    return {
        "tokens_per_s": W3_REQUESTS * OUTPUT_TOKENS / ends[-1],
        "ttft_p50_s": nan,
        "ttft_p99_s": nan,
        "itl_p50_s": nan,
        "e2e_p99_s": pct(ends, 99),
        "failures": 0,
    }
