"""Attention alone: one GroupQueryAttention node shaped like a bundle's layers, timed per call, on the CPU.

    python -m loadtests.attention --bundle bundles/smollm2-135m [--compare-flash]

The node is the bundle's: packed q/k/v in, rotary inside, one shared buffer bound as past and present (the cache of
`--cache-len` positions), the bundle's heads and head size. Cases (rows x new tokens over positions already cached):
decode steps of 1 and 16 rows at a few cache lengths, a fresh 128-token prompt, and a 32-token continuation of a
1,000-token cached prefix (W4's later turns), one row or four in one call; those that do not fit the buffer are left
out. Prints one JSON line per case and op: the median milliseconds of a call, the same times the bundle's layer
count (a forward pass's attention), and the keys and values read per second (every row's cached positions, once).
`--op causal --against OLD.so` times another build of ortkernels/ (an earlier commit's) beside this one's.
`--compare-flash` runs the cases again with onnxruntime's flash/decode kernels off (ORT_DISABLE_FLASH_ATTENTION=1, read
when a session is created) in a second process, alternating. `--cache int8-per-channel` (or `int8-per-tensor`) times
onnxruntime's quantized cache instead: int8 keys and values with static scales, written and read by the same node
(not what a bundle exports).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

import ortkernels

CASES = [  # (rows, new tokens a row, positions already cached)
    (1, 1, 256),
    (1, 1, 1024),
    (16, 1, 128),
    (16, 1, 256),
    (16, 1, 1024),
    (1, 128, 0),
    (1, 32, 1000),
    (4, 32, 1000),  # four chats' turns in one call
]


def attention_graph(
    n_head: int, n_kv_head: int, head_dim: int, cache_len: int, cache: str = "fp32", op: str = "gqa"
) -> bytes:
    """One GroupQueryAttention node as the exporter writes it (export/ops.py GroupQueryAttention.symbolic); with an
    int8 cache, onnxruntime's quantized-cache form of it (symmetric, static scales per channel or per tensor); with
    op "causal", the project's CausalAttention (ortkernels/attention.c) in its place, as the exporter rewrites it."""
    f = TensorProto.FLOAT
    cache_type = f if cache == "fp32" else TensorProto.INT8
    inputs = [
        helper.make_tensor_value_info("qkv", f, ["B", "S", (n_head + 2 * n_kv_head) * head_dim]),
        helper.make_tensor_value_info("past_key", cache_type, ["B", n_kv_head, cache_len, head_dim]),
        helper.make_tensor_value_info("past_value", cache_type, ["B", n_kv_head, cache_len, head_dim]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["B"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        helper.make_tensor_value_info("cos_cache", f, [cache_len, head_dim // 2]),
        helper.make_tensor_value_info("sin_cache", f, [cache_len, head_dim // 2]),
    ]
    names = ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total_sequence_length", "cos_cache", "sin_cache"]
    quantized: dict = {}
    scales = []
    if cache != "fp32":  # inputs 9-11 (position_ids, attention_bias, head_sink) omitted, then k_scale, v_scale
        kind = {"int8-per-channel": "PER_CHANNEL", "int8-per-tensor": "PER_TENSOR"}[cache]
        quantized = {"k_quant_type": kind, "v_quant_type": kind, "kv_cache_bit_width": 8}
        shape = [n_kv_head * head_dim] if kind == "PER_CHANNEL" else [1]
        scales = [helper.make_tensor(name, f, shape, [0.05] * shape[0]) for name in ("k_scale", "v_scale")]
        names += ["", "", "", "k_scale", "v_scale"]
    attributes: dict = {"num_heads": n_head, "kv_num_heads": n_kv_head, **quantized}
    if op == "gqa":
        attributes |= {"do_rotary": 1, "rotary_interleaved": 0}
    else:
        names = [name for name in names if name]  # no separate key/value inputs
    node = helper.make_node(
        "GroupQueryAttention" if op == "gqa" else "CausalAttention",
        names,
        ["out", "present_key", "present_value"],
        domain="com.microsoft" if op == "gqa" else ortkernels.DOMAIN,
        **attributes,
    )
    outputs = [helper.make_tensor_value_info("out", f, None)]
    outputs += [helper.make_tensor_value_info(name, cache_type, None) for name in ("present_key", "present_value")]
    graph = helper.make_graph([node], "attention", inputs, outputs, initializer=scales)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(node.domain, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()


def measure(
    model: dict, cache_len: int, threads: int, calls: int, cache: str, ops: list[str], against: Path | None = None
) -> list[dict]:
    """Each case on each op's session, their calls alternating (one process: the machine's speed is the same). Op
    "against": CausalAttention from the library file `against` (another build of ortkernels/)."""
    n_head, n_kv, D, layers = model["n_head"], model["n_kv_head"], model["d_model"] // model["n_head"], model["n_layer"]
    options = ort.SessionOptions()
    other = ort.SessionOptions()
    for o in (options, other):
        o.intra_op_num_threads = threads
        if len(ops) > 1:  # each session has its own threads, and the idle one's would spin on the cores the other
            # is using: alternating calls measured up to 2x apart from run to run with spinning, within 2% without
            o.add_session_config_entry("session.intra_op.allow_spinning", "0")
    ortkernels.register(options)
    if against is not None:
        other.register_custom_ops_library(str(against))
    sessions = {
        op: ort.InferenceSession(
            attention_graph(n_head, n_kv, D, cache_len, cache, "causal" if op == "against" else op),
            other if op == "against" else options,
            ["CPUExecutionProvider"],
        )
        for op in ops
    }
    rng = np.random.default_rng(0)
    cos, sin = (rng.standard_normal((cache_len, D // 2), dtype=np.float32) for _ in range(2))  # (T_max, D/2)
    rows = []
    for B, S, L in [c for c in CASES if c[1] + c[2] <= cache_len]:  # those whose positions fit the buffer
        shape = (B, n_kv, cache_len, D)  # (B, H_kv, T_max, D)
        buffers: list[np.ndarray]
        if cache == "fp32":
            buffers = [rng.standard_normal(shape, dtype=np.float32) for _ in range(2)]
        else:
            buffers = [rng.integers(-100, 100, shape, dtype=np.int8) for _ in range(2)]
        kv = [ort.OrtValue.ortvalue_from_numpy(b) for b in buffers]
        qkv = rng.standard_normal((B, S, (n_head + 2 * n_kv) * D), dtype=np.float32)
        bindings = {}
        for op, session in sessions.items():
            binding = bindings[op] = session.io_binding()
            binding.bind_cpu_input("qkv", qkv)
            binding.bind_cpu_input("seqlens_k", np.full(B, L + S - 1, np.int32))  # (B,) each row's length - 1
            binding.bind_cpu_input("total_sequence_length", np.array(L + S, np.int32))
            binding.bind_cpu_input("cos_cache", cos)
            binding.bind_cpu_input("sin_cache", sin)
            for name, value in zip(("key", "value"), kv):  # one buffer as past and present, as the engine binds it
                binding.bind_ortvalue_input(f"past_{name}", value)
                binding.bind_ortvalue_output(f"present_{name}", value)
            binding.bind_output("out")
        times: dict[str, list[float]] = {op: [] for op in ops}
        for call in range(calls):  # the order turned every call (A B B A ...): the first of two ran 3-6% faster
            for op in ops if call % 2 == 0 else ops[::-1]:
                start = time.perf_counter()
                sessions[op].run_with_iobinding(bindings[op])
                times[op].append(time.perf_counter() - start)
        for op in ops:
            ms = statistics.median(times[op][3:]) * 1e3
            kv_bytes = B * n_kv * 2 * (L + S) * D * (4 if cache == "fp32" else 1)
            rows.append(
                {
                    "op": op,
                    "rows": B,
                    "new_tokens": S,
                    "cached": L,
                    "ms_per_call": round(ms, 3),
                    "ms_all_layers": round(ms * layers, 1),
                    "kv_read_gbs": round(kv_bytes / ms / 1e6, 1),
                }
            )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m loadtests.attention", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=Path("bundles/smollm2-135m"))
    p.add_argument("--cache-len", type=int, default=1280, help="the cache buffer's positions (make bench serves 1,280)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: one per core)")
    p.add_argument("--calls", type=int, default=30)
    p.add_argument("--rounds", type=int, default=2, help="with --compare-flash: alternations")
    p.add_argument("--compare-flash", action="store_true")
    p.add_argument("--cache", choices=["fp32", "int8-per-channel", "int8-per-tensor"], default="fp32")
    p.add_argument(
        "--op",
        choices=["gqa", "causal", "both"],
        default="gqa",
        help="onnxruntime's GroupQueryAttention, the project's CausalAttention (ortkernels/), or both alternating",
    )
    p.add_argument(
        "--against",
        type=Path,
        help="another build of ortkernels/ (a .so): its CausalAttention alternates with the op(s) chosen, case by case",
    )
    args = p.parse_args()
    model = json.loads((args.bundle / "manifest.json").read_text())["model"]
    if not args.compare_flash:
        flash = os.environ.get("ORT_DISABLE_FLASH_ATTENTION", "0") != "1"
        ops = (["gqa", "causal"] if args.op == "both" else [args.op]) + (["against"] if args.against else [])
        for row in measure(model, args.cache_len, args.threads, args.calls, args.cache, ops, args.against):
            print(json.dumps({"cache": args.cache, "flash": flash, **row}), flush=True)
        return
    again = [sys.executable, "-m", "loadtests.attention", "--bundle", str(args.bundle), "--cache-len"]
    again += [str(args.cache_len), "--threads", str(args.threads), "--calls", str(args.calls), "--cache", args.cache]
    for _ in range(args.rounds):
        for off in ("0", "1"):
            subprocess.run(again, check=True, env={**os.environ, "ORT_DISABLE_FLASH_ATTENTION": off})


if __name__ == "__main__":
    main()
