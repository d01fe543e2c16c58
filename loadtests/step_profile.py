"""Engine-level decode steps of one bundle: tokens/s and where a step's time goes (session.run vs the rest).

    python -m loadtests.step_profile --bundle bundles/smollm2-135m --batch 1 16

No HTTP, no scheduler: the service's Engine alone, greedy, every row prefilled with a 128-token prompt, then
`--steps` decode steps over the rows at once. "graph" is the time inside `session.run_with_iobinding`; "outside" is
the rest of `Engine.forward` plus the argmax (binding, copying logits to numpy). Prints one JSON line per batch size.
It reads bundles of format 1 (every position's logits) too, through that version's engine, so the same file can be
run from an older checkout (`PYTHONPATH=<old checkout> python loadtests/step_profile.py ...`) for a side-by-side.
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from pathlib import Path

import numpy as np

PROMPT = 128


def time_graph(session) -> list[float]:  # type: ignore[no-untyped-def]
    """Wraps session.run_with_iobinding; the returned one-element list accumulates seconds spent inside it."""
    graph_s = [0.0]
    run = session.run_with_iobinding

    def timed_run(*args, **kwargs):  # type: ignore[no-untyped-def]  # (binding[, run options])
        t = time.perf_counter()
        run(*args, **kwargs)
        graph_s[0] += time.perf_counter() - t

    session.run_with_iobinding = timed_run
    return graph_s


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()

    from service.bundle import load_bundle
    from service.engine import Engine

    bundle = load_bundle(args.bundle, verify_checksums=False)
    engine = Engine(bundle, slots=max(args.batch), max_len=PROMPT + args.steps + 1, device="cpu", threads=args.threads)
    selects = "logits_index" in inspect.signature(engine.forward).parameters  # format 2: logits only where read
    graph_s = time_graph(engine.session)
    rng = np.random.default_rng(0)
    for batch in args.batch:
        for row in range(batch):  # prefill each row in its own slot, as the scheduler does
            ids = rng.integers(100, 20000, size=(1, PROMPT))
            extra = (np.array([PROMPT - 1]),) if selects else ()
            engine.forward(ids, np.arange(PROMPT)[None], np.array([PROMPT - 1], np.int32), row, row + 1, *extra)
        lengths = np.full(batch, PROMPT)
        tokens = rng.integers(100, 20000, size=batch)
        graph_s[0] = 0.0
        t0 = time.perf_counter()
        for _ in range(args.steps):
            extra = (np.arange(batch),) if selects else ()
            logits = engine.forward(tokens[:, None], lengths[:, None], lengths.astype(np.int32), 0, batch, *extra)
            tokens = logits.reshape(batch, -1).argmax(-1)
            lengths = lengths + 1
        total = time.perf_counter() - t0
        step_ms, graph_ms = 1e3 * total / args.steps, 1e3 * graph_s[0] / args.steps
        report = {
            "bundle": str(args.bundle),
            "format_version": bundle.manifest["format_version"],
            "batch": batch,
            "steps": args.steps,
            "tokens_per_s": round(batch * args.steps / total, 1),
            "step_ms": round(step_ms, 2),
            "graph_ms": round(graph_ms, 2),
            "outside_ms": round(step_ms - graph_ms, 2),
        }
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
