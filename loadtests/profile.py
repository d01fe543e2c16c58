"""onnxruntime's profiler over single-row decode steps of a bundle: kernel time per step by op type.

    python -m loadtests.profile --bundle bundles/smollm2-135m-int4 --steps 40

The graph runs with plain `session.run` over numpy caches (export/parity.py's OrtRunner, profiling on): a
128-token prompt, then `--steps` decode steps of one row. Prints a markdown table (op, ms/step, share, nodes) of
the `--top` op types and the total; the profiler's own overhead inflates every figure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort


def profile(bundle_dir: Path, steps: int, prompt_tokens: int) -> tuple[dict[str, float], dict[str, set[str]], int]:
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    cache = manifest["graph"]["cache"]
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "decode")
    options.log_severity_level = 3
    session = ort.InferenceSession(str(bundle_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
    dtype = np.float16 if manifest["dtype"] == "fp16" else np.float32
    max_len = prompt_tokens + steps + 1
    shape = (1, cache["kv_heads"], max_len, cache["head_dim"])  # (B, H_kv, T_max, D)
    names = [f"past_key_values.{i}.{kind}" for i in range(cache["n_layer"]) for kind in ("key", "value")]
    past = {name: np.zeros(shape, dtype) for name in names}

    def run(ids: np.ndarray, start: int) -> np.ndarray:
        n = ids.shape[1]
        feed = {
            "input_ids": ids,
            "position_ids": np.arange(start, start + n)[None],  # read by learned-position (GPT-2) graphs only
            "seqlens_k": np.array([start + n - 1], np.int32),
            "total_sequence_length": np.array(start + n, np.int32),
            "logits_index": np.array([n - 1]),  # the last position's logits: (1, V)
            **past,
        }
        inputs = {i.name for i in session.get_inputs()}
        out = session.run(None, {k: v for k, v in feed.items() if k in inputs})
        for name, value in zip([o.name for o in session.get_outputs()][1:], out[1:]):
            past[name.replace("present", "past_key_values")] = value
        return out[0]

    rng = np.random.default_rng(0)
    logits = run(rng.integers(100, manifest["model"]["vocab_size"], prompt_tokens)[None], 0)
    for t in range(steps):
        logits = run(logits.argmax(-1)[:, None], prompt_tokens + t)
    trace_file = Path(session.end_profiling())
    trace = json.loads(trace_file.read_text())
    shutil.rmtree(trace_file.parent)
    runs = [e for e in trace if e.get("name") == "model_run"]
    first_decode = runs[1]["ts"] if len(runs) > 1 else 0  # skip the prefill
    per_op: dict[str, float] = defaultdict(float)
    nodes: dict[str, set[str]] = defaultdict(set)
    for e in trace:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first_decode:
            op = e["args"]["op_name"]
            per_op[op] += e["dur"] / 1e3 / steps  # ms per step
            nodes[op].add(e["name"])
    return per_op, nodes, steps


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m loadtests.profile", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=Path("bundles/smollm2-135m-int4"))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--top", type=int, default=10)
    args = p.parse_args()
    per_op, nodes, _ = profile(args.bundle, args.steps, args.prompt_tokens)
    total = sum(per_op.values())
    print(f"{args.steps} single-row decode steps of {args.bundle}: {total:.1f} ms of kernel time per step")
    print("| op | ms/step | share | nodes |\n|---|---|---|---|")
    for op, ms in sorted(per_op.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"| {op} | {ms:.2f} | {ms / total:.1%} | {len(nodes[op])} |")


if __name__ == "__main__":
    main()
