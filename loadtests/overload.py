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

from loadtests.run import REPO, start_service
from loadtests.workloads import pct

RUNNING, WAITING = 16, 256  # the service's defaults (--max-num-seqs, --max-waiting-requests)
TOKENS = 32


async def one(host: str, port: int, i: int) -> tuple[int, float, int]:
    """One streamed completion over a raw HTTP/1.1 connection of its own: (status, seconds from sending the request
    to the status line for a refusal or to the end of the stream, completion tokens). Raw sockets keep the client's
    own cost out of the refusal latency (a client library's pool of 400 connections costs more than the answer)."""
    body = json.dumps(
        {
            "model": "smollm2-135m",
            "prompt": f"Request {i}: write a sentence.",
            "max_tokens": TOKENS,
            "min_tokens": TOKENS,
            "ignore_eos": True,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        t = time.perf_counter()  # connected: the client's own work of opening 400 connections is not the server's
        writer.write(head + body)
        status = int((await reader.readline()).split()[1])
        answered = time.perf_counter() - t  # the status line
        while await reader.readline() not in (b"\r\n", b""):  # the headers
            pass
        if status != 200:
            return status, answered, 0
        tokens, text = 0, b""
        while size := int((await reader.readline()).strip() or b"0", 16):  # chunked transfer encoding
            text += await reader.readexactly(size + 2)
        for line in text.decode().splitlines():
            if line.startswith("data: {") and '"usage":{' in line.replace(" ", ""):
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
        return status, time.perf_counter() - t, tokens
    finally:
        writer.close()


async def run(url: str, n: int) -> dict:
    host, port = url.removeprefix("http://").split(":")
    results = await asyncio.gather(*(one(host, int(port), i) for i in range(n)))
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
