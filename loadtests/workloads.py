"""The benchmark's workloads, shared by our HTTP client and the peers (no project imports: peers run it too)."""

from __future__ import annotations

import random
import statistics

PROMPT_TOKENS = 128
OUTPUT_TOKENS = 128
W1_REPEATS = 5
W2_STREAMS = 16
W3_REQUESTS, W3_RUNNING = 64, 16


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
