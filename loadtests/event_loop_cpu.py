"""What delivering a token costs the server's event loop: CPU time per generated token, by thread (Linux).

    python -m loadtests.event_loop_cpu --bundle bundles/smollm2-135m-int4 [--tokens 256 --requests 4 --rounds 2]

Starts the service on the bundle (`loadtests.bench`'s `serve`: the service as `make bench` runs it), then, round after
round, sends `--requests` greedy completions of `--tokens` tokens one after another, streamed and not, and reads
every thread's CPU time from /proc/<pid>/task before and after. The main thread runs uvicorn's event loop: its CPU
per token is what one token costs between the engine thread's event and the bytes on the socket (the SSE frame only
when streamed); the engine thread and onnxruntime's workers spin through each step, so theirs is about the wall time
per token. The clock's tick is 10 ms, so a round's figure is within 10 ms / (tokens x requests). One JSON line per
round and mode; the client reads whole responses in 64 KiB blocks, so its own work per token is small.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import urllib.request
from pathlib import Path

from loadtests.bench import serve

TICK = os.sysconf("SC_CLK_TCK")  # /proc stat times count clock ticks


def thread_cpu(pid: int) -> dict[int, float]:
    """Seconds of CPU (user + system) of each thread of process `pid`."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14 and 15 of stat)
    return out


def complete(url: str, model: str, tokens: int, stream: bool) -> None:
    body = {
        "model": model,
        "prompt": "Once upon a time",
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }
    headers = {"Content-Type": "application/json"}
    req = urllib.request.Request(f"{url}/v1/completions", json.dumps(body).encode(), headers)
    with urllib.request.urlopen(req, timeout=600) as resp:
        while resp.read(65536):
            pass


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m loadtests.event_loop_cpu", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=Path("bundles/smollm2-135m-int4"))
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: all cores)")
    args = p.parse_args()

    proc, url = serve(args.bundle, args.threads)
    try:
        model = json.load(urllib.request.urlopen(f"{url}/v1/models"))["data"][0]["id"]
        complete(url, model, 16, True)  # warm-up
        for r in range(args.rounds):
            for stream in (True, False):
                before, start = thread_cpu(proc.pid), time.perf_counter()
                for _ in range(args.requests):
                    complete(url, model, args.tokens, stream)
                wall, after = time.perf_counter() - start, thread_cpu(proc.pid)
                n = args.tokens * args.requests
                spent = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
                others = sorted((s for tid, s in spent.items() if tid != proc.pid), reverse=True)
                row = {
                    "round": r + 1,
                    "stream": stream,
                    "tokens": n,
                    "wall_ms_per_token": round(wall / n * 1e3, 3),
                    "event_loop_us_per_token": round(spent.get(proc.pid, 0.0) / n * 1e6, 1),
                    "busiest_other_threads_us_per_token": [round(s / n * 1e6, 1) for s in others[:3]],
                }
                print(json.dumps(row), flush=True)
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
