"""Time to first token of long prompts, the service with two `--prefill-chunk` values side by side.

    python -m loadtests.long_prompt --bundle bundles/smollm2-135m [--tokens 1032 --rounds 6 --chunks 1280,0]

Starts the service on the bundle twice (`loadtests.bench`'s `serve`, the prefix cache off so every prompt is computed
whole), one per `--chunks` value (0: the device's default, 256 on the CPU; a value at least the prompt's length: one
graph call for the prompt). Round after round, each server gets one streamed greedy completion of a new random prompt
of `--tokens` token ids, in turn; the time to its first token is measured on the client. Prints one JSON line per
server (the times in ms and their median) and the median of the per-round ratios of each to the first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import httpx
import numpy as np

from loadtests.bench import serve


def first_token_s(client: httpx.Client, url: str, model: str, prompt: list[int]) -> float:
    body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0, "stream": True}
    start = time.perf_counter()
    with client.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                return time.perf_counter() - start
    raise RuntimeError(f"{url}: the stream ended without a token")


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m loadtests.long_prompt", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=Path("bundles/smollm2-135m"))
    p.add_argument("--tokens", type=int, default=1032, help="prompt length (W4's system prompt and user turn)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--chunks", default="1280,0", help="comma-separated --prefill-chunk values, one server each")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    chunks = [int(c) for c in args.chunks.split(",")]
    servers = [serve(args.bundle, args.threads, "--no-prefix-cache", "--prefill-chunk", str(c)) for c in chunks]
    try:
        with httpx.Client() as client:
            models = [client.get(f"{url}/v1/models").json()["data"][0]["id"] for _, url in servers]
            rng = np.random.default_rng(0)
            vocab = 300  # ids every bundle has (the tests' tiny one has 400)
            for (_, url), model in zip(servers, models):  # warm-up
                first_token_s(client, url, model, rng.integers(10, vocab, args.tokens).tolist())
            times: list[list[float]] = [[] for _ in servers]
            for _ in range(args.rounds):
                for (_, url), model, got in zip(servers, models, times):
                    got.append(first_token_s(client, url, model, rng.integers(10, vocab, args.tokens).tolist()))
    finally:
        for proc, _ in servers:
            proc.terminate()
            proc.wait(30)
    for chunk, got in zip(chunks, times):
        ratio = statistics.median(t / t0 for t, t0 in zip(got, times[0]))
        out = {"prefill_chunk": chunk, "tokens": args.tokens, "ttft_ms": [round(t * 1e3, 1) for t in got]}
        out |= {"median_ms": round(statistics.median(got) * 1e3, 1), "ratio_to_first": round(ratio, 3)}
        print(json.dumps(out))


if __name__ == "__main__":
    main()
