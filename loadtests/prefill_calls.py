"""A burst of fresh prompts prefilled in calls of a few rows each, the engine alone: how long the burst's median prompt
waits for its first logits, and the whole burst, per rows-per-call, alternating.

    python -m loadtests.prefill_calls --bundle bundles/smollm2-135m --rows 1,2,4 --rounds 5

The scheduler sends each call's first tokens before it makes the next call (service/scheduler.py), so a prompt's
first token waits for the calls before its own: with the same cost per token, smaller calls give the median prompt
its first token sooner. This measures whether the cost per token holds at each size. Each prompt gets its own slot
and random tokens; every round runs each rows-per-call once, the order reversed every other round. Prints one JSON
line per run, then one with the medians per rows-per-call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from service.bundle import load_bundle
from service.engine import Engine


def burst(engine: Engine, prompts: np.ndarray, rows: int) -> list[float]:
    """Prefills prompts (P, S), `rows` to a call in slot order; -> seconds from the start to each prompt's logits."""
    P, S = prompts.shape
    ready, clock = [], 0.0
    for lo in range(0, P, rows):
        hi = min(lo + rows, P)
        B = hi - lo
        start = time.perf_counter()
        engine.forward(
            prompts[lo:hi],  # (B, S)
            np.tile(np.arange(S), (B, 1)),  # (B, S)
            np.full(B, S - 1, np.int32),  # (B,)
            lo,
            hi,
            np.arange(B) * S + S - 1,  # each row's last position
        )
        clock += time.perf_counter() - start
        ready += [clock] * B
    return ready


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.prefill_calls", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=Path("bundles/smollm2-135m"))
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--rows", default="1,2,4", help="comma-separated rows per call")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: all cores)")
    args = p.parse_args(argv)
    sizes = [int(r) for r in args.rows.split(",")]
    bundle = load_bundle(args.bundle, verify_checksums=False)
    engine = Engine(bundle, args.prompts, args.prompt_tokens + 1, "auto", args.threads)
    rng = np.random.default_rng(0)
    prompts = rng.integers(100, bundle.vocab_size, (args.prompts, args.prompt_tokens))  # (P, S)
    burst(engine, prompts, sizes[0])  # warm-up
    runs: dict[int, list[dict]] = {rows: [] for rows in sizes}
    for r in range(args.rounds):
        for rows in sizes if r % 2 == 0 else sizes[::-1]:
            ready = burst(engine, prompts, rows)
            run = {"round": r + 1, "rows_per_call": rows, "median_first_ms": statistics.median(ready) * 1e3}
            run["burst_ms"] = ready[-1] * 1e3
            runs[rows].append(run)
            print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in run.items()}), flush=True)
    summary = {
        f"{rows} rows": {k: round(statistics.median(x[k] for x in got), 1) for k in ("median_first_ms", "burst_ms")}
        for rows, got in runs.items()
    }
    print(json.dumps({"bundle": str(args.bundle), "prompts": args.prompts, **summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
