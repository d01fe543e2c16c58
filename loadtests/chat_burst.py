"""A burst of sampled chats against a running server: tokens/s and inter-token latency at the model's defaults.

    python -m loadtests.chat_burst --url http://127.0.0.1:8000/v1 --streams 16 --tokens 128 --bursts 2
    python -m loadtests.chat_burst --temperature 1.0 --top-p 0.95     # a wide distribution, as many clients send

Each burst sends `--streams` streamed chat completions at once through the openai client, without temperature or
top_p unless given (so each is sampled at the bundle's generation defaults), seeded, `ignore_eos` so that each
writes exactly `--tokens` tokens; one request before the first burst warms the server. Prints one JSON line per
burst: aggregate output tokens/s and the inter-token latency's p50/p99 over every stream. (make bench's workloads
are greedy; this is the sampled counterpart docs/BENCHMARKS.md quotes for `--reduce-logits` and the sampler.)

    python -m loadtests.chat_burst --parts 2 --stagger 0.3 --temperature 0    # a burst that arrives in two parts

With `--parts P` the streams of a burst are sent in P equal groups, each `--stagger` seconds after the one before:
the stragglers of a burst reach a server that has already begun on its first requests. The line then also gives
how many gaps were over 3x the median (the stalls behind the p99) and the time to first token's p50/p99.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from openai import AsyncOpenAI

from loadtests.workloads import median, pct, stalls


async def one(
    client: AsyncOpenAI,
    model: str,
    i: int,
    tokens: int,
    gaps: list[float],
    sampling: dict,
    after: float = 0.0,
    ttfts: list[float] | None = None,
) -> int:
    """One streamed chat, sent `after` seconds from now; appends its inter-token gaps (and its time to first token
    to `ttfts`); returns the tokens (content chunks) received."""
    await asyncio.sleep(after)
    sent = time.perf_counter()
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"Tell me a story about the number {i}."}],
        max_tokens=tokens,
        stream=True,
        seed=i,
        extra_body={"ignore_eos": True},
        **sampling,
    )
    n, last = 0, time.perf_counter()
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            now = time.perf_counter()
            if n:
                gaps.append(now - last)
            elif ttfts is not None:
                ttfts.append(now - sent)
            n, last = n + 1, now
    return n


async def main(args: argparse.Namespace) -> None:
    client = AsyncOpenAI(base_url=args.url, api_key=args.api_key)
    model = (await client.models.list()).data[0].id
    sampling = {k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p)) if v is not None}
    await one(client, model, -1, args.tokens, [], sampling)
    for burst in range(args.bursts):
        gaps: list[float] = []
        ttfts: list[float] = []
        t = time.perf_counter()
        group = -(-args.streams // args.parts)  # streams per part
        streams = [
            one(client, model, i, args.tokens, gaps, sampling, (i // group) * args.stagger, ttfts)
            for i in range(args.streams)
        ]
        n = sum(await asyncio.gather(*streams))
        wall = time.perf_counter() - t
        out = {"burst": burst + 1, "streams": args.streams, "tokens_per_s": round(n / wall, 1)}
        out |= {"itl_p50_ms": round(median(gaps) * 1e3, 2), "itl_p99_ms": round(pct(gaps, 99) * 1e3, 2)}
        if args.parts > 1:
            out |= {
                "parts": args.parts,
                "stagger_s": args.stagger,
                "gaps_over_3x_median": stalls(gaps),
                "gaps": len(gaps),
                "ttft_p50_ms": round(median(ttfts) * 1e3, 1),
                "ttft_p99_ms": round(pct(ttfts, 99) * 1e3, 1),
            }
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m loadtests.chat_burst")
    p.add_argument("--url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default="none")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--bursts", type=int, default=2)
    p.add_argument("--temperature", type=float, help="sent with every request (default: none, the model's own)")
    p.add_argument("--top-p", type=float, help="sent with every request (default: none, the model's own)")
    p.add_argument("--parts", type=int, default=1, help="a burst's streams sent in this many groups")
    p.add_argument("--stagger", type=float, default=0.3, help="seconds between the groups (with --parts)")
    asyncio.run(main(p.parse_args()))
