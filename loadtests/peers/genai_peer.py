"""Peer: onnxruntime-genai with a model built by its own builder from the same weights, through its generator API.

Runs in .venv-peers (onnxruntime-genai pins its own onnxruntime). Builds `--out` from `--hf-dir` the first time
(`python -m onnxruntime_genai.models.builder -i HF_DIR -o OUT -p fp32|int4 -e cpu`). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime_genai as og

# appended, not first: loadtests/profile.py would shadow the standard library's profile (which cProfile imports)
sys.path.append(str(Path(__file__).resolve().parents[1]))
from workloads import OUTPUT_TOKENS, W1_REPEATS, W2_STREAMS, median, prompt, static_w3  # noqa: E402


def build(hf_dir: Path, out: Path, precision: str) -> None:
    if (out / "genai_config.json").is_file():
        return
    from transformers_peer import materialize

    materialize(hf_dir)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            str(hf_dir),
            "-o",
            str(out),
            "-p",
            precision,
            "-e",
            "cpu",
            "-c",
            str(out.parent / "cache"),
        ],
        check=True,
        stdout=sys.stderr,
    )


def run(model, batch: list[list[int]], new: int) -> tuple[float, list[float]]:
    """Greedy generation of `new` tokens per row; returns (seconds to the first token, times of later tokens)."""
    params = og.GeneratorParams(model)
    params.set_search_options(
        max_length=len(batch[0]) + new, min_length=len(batch[0]) + new, do_sample=False, batch_size=len(batch)
    )
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(np.array(batch, dtype=np.int32))
    gen.generate_next_token()
    first = time.perf_counter() - t0
    times = []
    while not gen.is_done():
        gen.generate_next_token()
        times.append(time.perf_counter() - t0)
    assert len(times) == new - 1, (len(times), new)
    return first, times


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hf-dir", type=Path, required=True)
    p.add_argument("--precision", choices=["fp32", "int4"], default="fp32")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    build(args.hf_dir, args.out, args.precision)
    model = og.Model(str(args.out))
    run(model, [prompt(999)], 8)  # warm-up
    w1 = [run(model, [prompt(i)], OUTPUT_TOKENS) for i in range(W1_REPEATS)]
    first, times = run(model, [prompt(100 + i) for i in range(W2_STREAMS)], OUTPUT_TOKENS)
    gaps = list(np.diff([first, *times]))
    w2 = {
        "tokens_per_s": W2_STREAMS * OUTPUT_TOKENS / times[-1],
        "ttft_p50_s": first,
        "ttft_p99_s": first,
        "itl_p50_s": median(gaps),
        "e2e_p99_s": times[-1],
        "failures": 0,
    }
    w3 = static_w3(lambda batch: run(model, batch, OUTPUT_TOKENS))
    w1_out = {
        "ttft_s": median([f for f, _ in w1]),
        "decode_tps": median([(OUTPUT_TOKENS - 1) / (t[-1] - f) for f, t in w1]),
    }
    weights = sum(f.stat().st_size for f in args.out.iterdir() if f.suffix in (".onnx", ".data"))
    print(json.dumps({"W1": w1_out, "W2": w2, "W3": w3, "weight_bytes": weights}))


if __name__ == "__main__":
    main()
