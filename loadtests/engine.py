"""The engine alone, without HTTP, the scheduler or sampling: decode speed of one bundle on this machine.

    python -m loadtests.engine --bundle bundles/smollm2-135m-int4 --rows 1     # one sequence: decode tokens/s
    python -m loadtests.engine --bundle bundles/smollm2-135m --rows 16         # a 16-row decode step: ms/step

Each row's cache slot is prefilled with a `--prompt-tokens` prompt, then `--steps` decode steps run over all rows
at once (greedy argmax on the host, as the scheduler would). Prints one JSON line: a prompt's prefill in ms and
ms per decode step (medians), and tokens/s (rows / median step time). docs/EXPORT.md and docs/BENCHMARKS.md
quote its figures.
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


def drive(engine: Engine, vocab_size: int, rows: int, prompt_tokens: int, steps: int) -> tuple[list[float], ...]:
    """Prefills each row's slot with its own random prompt (one call each), then runs `steps` greedy decode steps
    over all rows at once, as the scheduler's decode call does. -> (seconds per prefill, seconds per decode step)."""
    rng = np.random.default_rng(0)
    last = np.zeros((rows, 1), np.int64)  # (B, 1)
    prefills, times = [], []
    for slot in range(rows):
        prompt = rng.integers(100, vocab_size, prompt_tokens)[None]  # (1, P)
        at = np.array([prompt_tokens - 1])  # the last position: its logits, and seqlens_k
        start = time.perf_counter()
        logits = engine.forward(prompt, np.arange(prompt_tokens)[None], at.astype(np.int32), slot, slot + 1, at)
        prefills.append(time.perf_counter() - start)
        last[slot, 0] = int(logits[0].argmax())  # logits (1, V)
    lengths = np.full(rows, prompt_tokens)  # (B,) positions already written in every row
    for _ in range(steps):
        start = time.perf_counter()
        logits = engine.forward(last, lengths[:, None], lengths.astype(np.int32), 0, rows, np.arange(rows))  # (B, V)
        last = logits.argmax(-1)[:, None]
        times.append(time.perf_counter() - start)
        lengths += 1
    return prefills, times


def measure(bundle_dir: Path, rows: int, prompt_tokens: int, steps: int, threads: int) -> dict[str, float | str]:
    bundle = load_bundle(bundle_dir, verify_checksums=False)
    engine = Engine(bundle, rows, prompt_tokens + steps + 1, "auto", threads)
    prefills, times = drive(engine, bundle.vocab_size, rows, prompt_tokens, steps)
    step = statistics.median(times)
    return {
        "rows": rows,
        "prefill_ms": statistics.median(prefills) * 1e3,  # one prompt of `prompt_tokens`, batch 1
        "ms_per_step": step * 1e3,
        "tokens_per_s": rows / step,
        "device": engine.device,
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m loadtests.engine", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=Path("bundles/smollm2-135m"))
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: all cores)")
    args = p.parse_args()
    result = measure(args.bundle, args.rows, args.prompt_tokens, args.steps, args.threads)
    print(json.dumps({"bundle": str(args.bundle), **result}))


if __name__ == "__main__":
    main()
