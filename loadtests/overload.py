"""Overload run: 400 streams at once against a service with the default bounds (16 running + 256 waiting).

    python -m loadtests.overload [--bundle bundles/smollm2-135m] [--streams 400]

The excess must get 429 quickly (p50/p99 rejection latency reported: from sending the request to its status line,
while the accepted streams are running) and every accepted request must complete.
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

RUNNING, WAITING = 16, 256  # the service's defaults (--max-num-seqs, --max-waiting-requests)
TOKENS = 32


async def one(client: httpx.AsyncClient, i: int) -> tuple[int, float, int]:
    body = {
        "model": "smollm2-135m",
        "prompt": f"Request {i}: write a sentence.",
        "max_tokens": TOKENS,
        "min_tokens": TOKENS,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t = time.perf_counter()
    async with client.stream("POST", "/v1/completions", json=body) as r:
        answered = time.perf_counter() - t  # the status line
        tokens = 0
        if r.status_code == 200:
            async for line in r.aiter_lines():
                if line.startswith("data: {") and '"usage":{' in line.replace(" ", ""):
                    tokens = json.loads(line[6:])["usage"]["completion_tokens"]
        else:
            await r.aread()
    return r.status_code, answered if r.status_code != 200 else time.perf_counter() - t, tokens


async def run(url: str, n: int) -> dict:
    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=n + 10)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        results = await asyncio.gather(*(one(client, i) for i in range(n)))
    refused = [t for s, t, _ in results if s == 429]
    accepted = [(t, k) for s, t, k in results if s == 200]
    return {
        "sent": n,
        "accepted": len(accepted),
        "refused_429": len(refused),
        "other": len(results) - len(refused) - len(accepted),
        "accepted_complete": all(k == TOKENS for _, k in accepted),
        "rejection_p50_ms": round(pct(refused, 50) * 1e3, 1),
        "rejection_p99_ms": round(pct(refused, 99) * 1e3, 1),
        "accepted_p99_s": round(pct([t for t, _ in accepted], 99), 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.overload")
    p.add_argument("--bundle", default=str(REPO / "bundles" / "smollm2-135m"))
    p.add_argument("--streams", type=int, default=400)
    args = p.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    proc = start_service(url, args.bundle, "--max-num-seqs", str(RUNNING), "--max-waiting-requests", str(WAITING))
    try:
        result = asyncio.run(run(url, args.streams))
    finally:
        proc.terminate()
        proc.wait(60)
    print(json.dumps(result))
    return 0 if result["other"] == 0 and result["accepted_complete"] and result["refused_429"] else 1


if __name__ == "__main__":
    sys.exit(main())
