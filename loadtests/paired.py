"""One-row decode of two or more bundles in one process, alternating every few steps: paired ratios that the
minute-to-minute drift of a shared machine cancels out of.

    python -m loadtests.paired bundles/old-int4 bundles/smollm2-135m-int4 --rounds 40
    python -m loadtests.paired bundles/smollm2-135m-int4@session.dynamic_block_base=0 bundles/smollm2-135m-int4

`--prefill S` times S-token prompt calls instead (`--cached L`: after L positions already cached, as a chat's next
turn; the same positions written again each time), one call per round per bundle, up to `--chunk` of them.

    python -m loadtests.paired bundles/gqa bundles/smollm2-135m --prefill 128 --rounds 20
    python -m loadtests.paired bundles/gqa bundles/smollm2-135m --prefill 32 --cached 1000 --rounds 20

`--rows 1,2,4,8` (with --prefill): calls of that many rows at once, each row its own prompt after its own cached
positions (several chats' next turns in one call), every row count of every bundle in turn each round (graphs on
the project's CausalAttention: onnxruntime's GroupQueryAttention takes several new tokens only on rows with no past).

    python -m loadtests.paired bundles/smollm2-135m --prefill 32 --cached 1000 --rows 1,2,4,8 --rounds 15

A bundle may carry onnxruntime session config entries for its engine after an @ (key=value, comma-separated), over
the service's own (service.engine.SESSION_CONFIG).

Each bundle gets the service's Engine (one row) and a `--prompt-tokens` random prompt; then, round after round,
each runs `--chunk` greedy decode steps in turn. Per bundle and round the median step time is kept; the report
gives each bundle's median over the rounds and the median of its per-round ratio to the first bundle's step time
(below 1: faster). One JSON line per bundle. Read the ratios: with two or more sessions in one process the absolute
step times run about 10% above one engine alone (their thread pools share the cores); a bundle paired with itself
gives 0.999.
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


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m loadtests.paired", description=__doc__.splitlines()[0])
    p.add_argument("bundles", nargs="+", help="a bundle directory, or DIR@key=value,... with session config entries")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--chunk", type=int, default=16, help="decode steps per bundle per round")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: all cores)")
    p.add_argument("--prefill", type=int, default=0, help="time prompt calls of this many tokens instead of decode")
    p.add_argument("--cached", type=int, default=0, help="with --prefill: positions already cached before them")
    p.add_argument("--rows", default="1", help="with --prefill: comma-separated rows per call (each its own prompt)")
    args = p.parse_args()
    if args.prefill:
        prefill(args)
        return
    engines, last, length = [], [], []
    for spec in args.bundles:
        path, _, entries = spec.partition("@")
        config = dict(entry.split("=", 1) for entry in entries.split(",") if entry)
        bundle = load_bundle(Path(path), verify_checksums=False)
        max_len = args.prompt_tokens + args.chunk * args.rounds + 1
        engine = Engine(bundle, 1, max_len, "auto", args.threads, session_config=config)
        prompt = np.random.default_rng(0).integers(100, bundle.vocab_size, args.prompt_tokens)[None]  # (1, P)
        at = np.array([args.prompt_tokens - 1])
        logits = engine.forward(prompt, np.arange(args.prompt_tokens)[None], at.astype(np.int32), 0, 1, at)  # (1, V)
        engines.append(engine)
        last.append(int(logits[0].argmax()))
        length.append(args.prompt_tokens)
    per_round: list[list[float]] = [[] for _ in engines]  # seconds per step, a median per round
    for _ in range(args.rounds):
        for i, engine in enumerate(engines):
            times = []
            for _ in range(args.chunk):
                start = time.perf_counter()
                ids, n = np.array([[last[i]]]), length[i]  # (1, 1)
                logits = engine.forward(ids, np.array([[n]]), np.array([n], np.int32), 0, 1, np.array([0]))  # (1, V)
                last[i], length[i] = int(logits[0].argmax()), n + 1
                times.append(time.perf_counter() - start)
            per_round[i].append(statistics.median(times))
    report(args, per_round, "step")


def prefill(args: argparse.Namespace) -> None:
    """Prompt calls: `--prefill` new tokens after `--cached` positions (a first prompt when there are none), in calls
    of each `--rows` count (rows [0, B) of the engine's cache, each with its own prompt)."""
    S, L = args.prefill, args.cached
    counts = [int(b) for b in args.rows.split(",")]
    engines: list[Engine] = []
    prompts: list[np.ndarray] = []  # (B, S) each engine's rows' new tokens
    runs: list[tuple[int, int]] = []  # (engine index, rows B) in the order they are timed
    for spec in args.bundles:
        path, _, entries = spec.partition("@")
        config = dict(entry.split("=", 1) for entry in entries.split(",") if entry)
        bundle = load_bundle(Path(path), verify_checksums=False)
        B = max(counts)
        if B > 1 and L and "CausalAttention" not in bundle.kernels:  # onnxruntime's GroupQueryAttention refuses it
            raise SystemExit(f"paired: {path}: several rows' prompts after cached positions need CausalAttention")
        engine = Engine(bundle, B, L + S + 1, "auto", args.threads, session_config=config)
        tokens = np.random.default_rng(0).integers(100, bundle.vocab_size, (B, L + S))  # (B, L + S)
        if L:
            at = np.full(B, L - 1)
            engine.forward(tokens[:, :L], np.tile(np.arange(L), (B, 1)), at.astype(np.int32), 0, B, at)
        runs += [(len(engines), b) for b in counts]
        engines.append(engine)
        prompts.append(tokens[:, L:])
    per_round: list[list[float]] = [[] for _ in runs]  # seconds per prompt call
    for _ in range(args.rounds):
        for r, (i, B) in enumerate(runs):
            times = []
            for _ in range(args.chunk):
                start = time.perf_counter()
                engines[i].forward(
                    prompts[i][:B],
                    np.tile(np.arange(L, L + S), (B, 1)),
                    np.full(B, L + S - 1, np.int32),
                    0,
                    B,
                    np.arange(B) * S + S - 1,
                )  # (B, V): each row's last logits
                times.append(time.perf_counter() - start)
            per_round[r].append(statistics.median(times))
    labels = [args.bundles[i] + (f" x{B} rows" if len(counts) > 1 else "") for i, B in runs]
    report(args, per_round, "call", labels)


def report(args: argparse.Namespace, per_round: list[list[float]], what: str, labels: list[str] | None = None) -> None:
    first = np.array(per_round[0])
    for spec, steps in zip(labels or args.bundles, per_round):
        step = statistics.median(steps)
        ratio = float(np.median(np.array(steps) / first))
        print(
            json.dumps(
                {
                    "bundle": spec,
                    f"ms_per_{what}": round(step * 1e3, 3),
                    **({"tokens_per_s": round(1 / step, 1)} if what == "step" else {"new_tokens": args.prefill}),
                    **({"cached": args.cached} if what == "call" else {}),
                    f"{what}_ratio_to_first": round(ratio, 3),
                    "rounds": args.rounds,
                }
            )
        )


if __name__ == "__main__":
    main()
