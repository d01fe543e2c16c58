"""What the exact Q4_1 minimum terms cost an int4 decode step: the bundle's graph against the same graph without them
(inexact: for timing only), each through the engine alone, alternating.

    python -m loadtests.minterm --bundle bundles/smollm2-135m-int4 --rounds 4

A Q4_1 projection of a bundle exported with `--int4-kernel matmulnbits` (the form without ortkernels/) is one
MatMulNBits whose input is [x, its block means spread over the digit segments] and whose
weights are the blocks followed by the minimum term's 4-bit digits (export/quantize.py, _minimum_digits). The
variant gives each such MatMulNBits x itself and only its first K/32 blocks of weights, in a copy of the bundle in a
temporary directory beside it (the weights rewritten, the other files hard-linked where they can be). Each run is
`python -m loadtests.engine --rows 1` in a process of its own. Prints one JSON line per run, then the medians and
the milliseconds per step the minimum terms cost.
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

import numpy as np
import onnx
from onnx import helper, numpy_helper

BLOCK = 32


def without_minimum_terms(bundle: Path, out: Path) -> int:
    """Writes the variant bundle to `out`; returns how many minimum terms it dropped."""
    model = onnx.load(bundle / "model.onnx")
    g = model.graph
    made_by = {o: n for n in g.node for o in n.output}
    inits = {i.name: i for i in g.initializer}
    drop: set[str] = set()
    for nbits in (n for n in g.node if n.op_type == "MatMulNBits" and n.input[0] in made_by):
        concat = made_by[nbits.input[0]]
        if concat.op_type != "Concat":
            continue
        spread = made_by[concat.input[1]]
        pool = made_by[spread.input[0]]
        assert (spread.op_type, pool.op_type) == ("MatMul", "AveragePool"), nbits.name
        attrs = {a.name: a for a in nbits.attribute}
        nb, N = inits[spread.input[1]].dims[0], attrs["N"].i  # spread: (K/32, D*P)
        K = nb * BLOCK
        q, scales, zero_points = (numpy_helper.to_array(inits[name]) for name in nbits.input[1:4])
        cut = {  # the first nb blocks of each column: (N, K'/32, 16), (N*K'/32,), (N*ceil(K'/64),) packed nibbles
            nbits.input[1]: q[:, :nb],
            nbits.input[2]: scales.reshape(N, -1)[:, :nb].reshape(-1),
            nbits.input[3]: zero_points.reshape(N, -1)[:, : -(-nb // 2)].reshape(-1),
        }
        for name, array in cut.items():
            inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), name))
        attrs["K"].CopyFrom(helper.make_attribute("K", K))
        nbits.input[0] = concat.input[0]
        drop |= {concat.name, spread.name, pool.name}
    kept = [n for n in g.node if n.name not in drop]
    del g.node[:]
    g.node.extend(kept)
    out.mkdir(parents=True)
    manifest = json.loads((bundle / "manifest.json").read_text())
    for name in manifest["files"]:
        if not name.startswith("model.onnx"):
            try:
                os.link(bundle / name, out / name)
            except OSError:
                shutil.copy2(bundle / name, out / name)
    onnx.save(model, out / "model.onnx", save_as_external_data=True, location="model.onnx.data")
    for name in ("model.onnx", "model.onnx.data"):  # checksums are not verified
        manifest["files"][name]["bytes"] = (out / name).stat().st_size
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
