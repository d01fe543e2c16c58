"""Overload run: twice the queue's capacity at once against a service started with a small queue.

    python -m loadtests.overload [--bundle bundles/smollm2-135m]

The excess must get 429 quickly (p50/p99 rejection latency reported) and every accepted request must complete.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time

import httpx

from loadtests.run import REPO, start_service
from loadtests.workloads import pct

RUNNING, WAITING = 4, 8


async def one(client: httpx.AsyncClient, i: int) -> tuple[int, float, int]:
    body = {
        "model": "smollm2-135m",
        "prompt": f"Request {i}: write a sentence.",
        "max_tokens": 32,
        "min_tokens": 32,
        "ignore_eos": True,
        "temperature": 0,
    }
    t = time.perf_counter()
    r = await client.post("/v1/completions", json=body)
    tokens = r.json()["usage"]["completion_tokens"] if r.status_code == 200 else 0
    return r.status_code, time.perf_counter() - t, tokens


async def run(url: str, n: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        results = await asyncio.gather(*(one(client, i) for i in range(n)))
    refused = [t for s, t, _ in results if s == 429]
    accepted = [(t, k) for s, t, k in results if s == 200]
    return {
        "sent": n,
        "accepted": len(accepted),
        "refused_429": len(refused),
        "other": len(results) - len(refused) - len(accepted),
        "accepted_complete": all(k == 32 for _, k in accepted),
        "rejection_p50_ms": round(pct(refused, 50) * 1e3, 1),
        "rejection_p99_ms": round(pct(refused, 99) * 1e3, 1),
        "accepted_p99_s": round(pct([t for t, _ in accepted], 99), 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.overload")
    p.add_argument("--bundle", default=str(REPO / "bundles" / "smollm2-135m"))
    args = p.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    proc = start_service(url, args.bundle, "--max-num-seqs", str(RUNNING), "--max-waiting-requests", str(WAITING))
    try:
        result = asyncio.run(run(url, 2 * (RUNNING + WAITING)))
    finally:
        proc.terminate()
        proc.wait(60)
    print(json.dumps(result))
    return 0 if result["other"] == 0 and result["accepted_complete"] and result["refused_429"] else 1


if __name__ == "__main__":
    sys.exit(main())
