"""Decode speed of a format-1 (unfused) bundle, run from a checkout of the commit before the fused graph.

    git worktree add ../old bb20b01 && cd ../old && python -m export --source default --out bundles/old
    PYTHONPATH=. python <this repo>/loadtests/engine_format1.py bundles/old ROWS

Same method as `python -m loadtests.engine` (128 random prompt tokens per row, the median of 64 decode steps), for
the side-by-side figures in docs/BENCHMARKS.md; a format-1 engine takes no logits_index.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def main() -> None:
    from service.bundle import load_bundle  # the old checkout's service, on PYTHONPATH
    from service.engine import Engine

    bundle_dir, rows = Path(sys.argv[1]), int(sys.argv[2])
    prompt_tokens, steps = 128, 64
    bundle = load_bundle(bundle_dir, verify_checksums=False)
    engine = Engine(bundle, rows, prompt_tokens + steps + 1, "auto", 0)
    rng = np.random.default_rng(0)
    last = np.zeros((rows, 1), np.int64)  # (B, 1)
    for slot in range(rows):
        prompt = rng.integers(100, bundle.vocab_size, prompt_tokens)[None]  # (1, P)
        seqlens = np.array([prompt_tokens - 1], np.int32)
        # (1, P, V) from the old checkout's Engine.forward, which takes no logits_index (mypy sees this checkout's)
        logits = engine.forward(prompt, np.arange(prompt_tokens)[None], seqlens, slot, slot + 1)  # type: ignore[call-overload]
        last[slot, 0] = int(logits[0, -1].argmax())
    times = []
    for t in range(steps):
        length = prompt_tokens + t
        start = time.perf_counter()
        positions, seqlens = np.full((rows, 1), length, np.int64), np.full(rows, length, np.int32)
        logits = engine.forward(last, positions, seqlens, 0, rows)  # type: ignore[call-overload]  # (B, 1, V)
        last = logits[:, -1].argmax(-1)[:, None]
        times.append(time.perf_counter() - start)
    step = statistics.median(times)
    print(json.dumps({"graph": "format 1", "rows": rows, "ms_per_step": step * 1e3, "tokens_per_s": rows / step}))


if __name__ == "__main__":
    main()
