"""onnxruntime's profiler over decode steps of a bundle through the service's Engine: kernel time per op type.

    python -m loadtests.profile --bundle bundles/smollm2-135m-int4 --steps 40 [--rows 16]
    python -m loadtests.profile --bundle bundles/smollm2-135m --prefill --prompt-tokens 1024 --steps 5

The service's `Engine` (IO binding, the cache buffers bound as past and present) with onnxruntime's profiler on:
each row prefilled with a 128-token prompt, then `--steps` greedy decode steps over all rows at once. With
`--prefill`, `--steps` prefills of one `--prompt-tokens` prompt each instead (after one more, not counted), one
session run each. Prints the time per session run and the kernels' share of it, then a markdown table (op, ms per
step or prefill, share, nodes) of the `--top` op types; the profiler's own overhead inflates every figure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

from loadtests.engine import drive
from service.bundle import load_bundle
from service.engine import Engine

Profile = tuple[dict[str, float], dict[str, set[str]], float]


def profile(bundle_dir: Path, steps: int, prompt_tokens: int, rows: int, prefill: bool = False) -> Profile:
    """-> (kernel ms per decode step (or prefill) by op type, node names by op type, ms per `model_run` of one)."""
    bundle = load_bundle(bundle_dir, verify_checksums=False)
    trace_dir = Path(tempfile.mkdtemp())
    if prefill:  # one warm-up prefill, then `steps` of them, each one session run of the whole prompt
        rows = 1
        engine = Engine(bundle, 1, prompt_tokens + 1, "cpu", profile_prefix=str(trace_dir / "prefill"))
        for _ in range(steps + 1):
            drive(engine, bundle.vocab_size, 1, prompt_tokens, 0)
    else:
        engine = Engine(bundle, rows, prompt_tokens + steps + 1, "cpu", profile_prefix=str(trace_dir / "decode"))
        drive(engine, bundle.vocab_size, rows, prompt_tokens, steps)
    trace_file = Path(engine.session.end_profiling())
    trace = json.loads(trace_file.read_text())
    shutil.rmtree(trace_dir, ignore_errors=True)
    trace_file.unlink(missing_ok=True)
    runs = [e for e in trace if e.get("name") == "model_run"]
    first_decode = runs[rows]["ts"]  # skip the prefills (with --prefill: the warm-up one)
    per_op: dict[str, float] = defaultdict(float)
    nodes: dict[str, set[str]] = defaultdict(set)
    for e in trace:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first_decode:
            op = e["args"]["op_name"]
            per_op[op] += e["dur"] / 1e3 / steps  # ms per step
            nodes[op].add(e["name"])
    return per_op, nodes, sum(r["dur"] for r in runs[rows:]) / 1e3 / steps


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m loadtests.profile", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=Path("bundles/smollm2-135m-int4"))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--rows", type=int, default=1, help="rows decoded together")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--prefill", action="store_true", help="profile --steps prefills of --prompt-tokens instead")
    args = p.parse_args()
    per_op, nodes, run_ms = profile(args.bundle, args.steps, args.prompt_tokens, args.rows, args.prefill)
    total = sum(per_op.values())
    what = f"prefills of {args.prompt_tokens} tokens" if args.prefill else f"decode steps of {args.rows} row(s)"
    print(
        f"{args.steps} {what}, {args.bundle}: {run_ms:.2f} ms per session run, "
        f"{total:.2f} ms of it in kernels (the rest: onnxruntime's own work between nodes)"
    )
    unit = "prefill" if args.prefill else "step"
    print(f"| op | ms/{unit} | share | nodes |\n|---|---|---|---|")
    for op, ms in sorted(per_op.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"| {op} | {ms:.2f} | {ms / total:.1%} | {len(nodes[op])} |")


if __name__ == "__main__":
    main()
