"""What the exact Q4_1 minimum terms cost an int4 decode step: the bundle's graph against the same graph without them
(inexact: for timing only), each through the engine alone, alternating.

    python -m loadtests.minterm --bundle bundles/smollm2-135m-int4 --rounds 4

A Q4_1 projection is a MatMulNBits (scale d, zero point 0) plus its minimum term, blocksum(x) @ m: an AveragePool
(block means), a MatMul with the (K/32, N) minimums (stored x 32) and an Add. The variant hands each MatMulNBits'
output straight to its Add's consumers, in a copy of the bundle in a temporary directory beside it (the weights
file hard-linked where it can be). Each run is `python -m loadtests.engine --rows 1` in a process of its own.
Prints one JSON line per run, then the medians and the milliseconds per step the minimum terms cost.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import onnx


def without_minimum_terms(bundle: Path, out: Path) -> int:
    """Writes the variant bundle to `out`; returns how many minimum terms it dropped."""
    model = onnx.load(bundle / "model.onnx", load_external_data=False)
    g = model.graph
    made_by = {o: n for n in g.node for o in n.output}
    drop: set[str] = set()
    for add in (n for n in g.node if n.op_type == "Add" and n.name.endswith("/MatMul/Add")):
        nbits, term = made_by[add.input[0]], made_by[add.input[1]]
        pool = made_by[term.input[0]]
        assert (nbits.op_type, term.op_type, pool.op_type) == ("MatMulNBits", "MatMul", "AveragePool"), add.name
        nbits.output[0] = add.output[0]
        drop |= {add.name, term.name, pool.name}
    kept = [n for n in g.node if n.name not in drop]
    del g.node[:]
    g.node.extend(kept)
    out.mkdir(parents=True)
    manifest = json.loads((bundle / "manifest.json").read_text())
    for name in manifest["files"]:
        if name != "model.onnx":
            try:  # a hard link: onnxruntime refuses external data that resolves outside the model's directory
                os.link(bundle / name, out / name)
            except OSError:
                shutil.copy2(bundle / name, out / name)
    onnx.save(model, out / "model.onnx")
    manifest["files"]["model.onnx"]["bytes"] = (out / "model.onnx").stat().st_size  # checksums are not verified
    (out / "manifest.json").write_text(json.dumps(manifest))
    return len(drop) // 3


def engine_tps(bundle: Path, args: argparse.Namespace) -> float:
    cmd = [sys.executable, "-m", "loadtests.engine", "--bundle", str(bundle), "--rows", "1"]
    cmd += ["--threads", str(args.threads), "--prompt-tokens", str(args.prompt_tokens), "--steps", str(args.steps)]
    run = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])["tokens_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m loadtests.minterm", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=Path("bundles/smollm2-135m-int4"))
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: all cores)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.bundle.parent) as tmp:  # beside the bundle: one filesystem
        variant = Path(tmp) / "without-minimum-terms"
        dropped = without_minimum_terms(args.bundle, variant)
        runs: dict[str, list[float]] = {"exact": [], "without minimum terms": []}
        for r in range(args.rounds):
            for name, bundle in (("exact", args.bundle), ("without minimum terms", variant)):
                runs[name].append(engine_tps(bundle, args))
                print(json.dumps({"round": r + 1, "graph": name, "tokens_per_s": round(runs[name][-1], 1)}))
    exact, without = (statistics.median(v) for v in runs.values())
    print(
        f"{dropped} minimum terms; one-row decode, medians of {args.rounds}: exact {exact:.1f} tok/s "
        f"({1e3 / exact:.2f} ms/step), without {without:.1f} tok/s ({1e3 / without:.2f} ms/step): "
        f"they cost {1e3 / exact - 1e3 / without:.2f} ms of each step"
    )


if __name__ == "__main__":
    main()
