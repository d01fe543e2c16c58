"""`make bench`: W1/W2/W3 for our service (HTTP, streaming) and for the peers on the same weights, in one run.

    W1  one stream, 128 prompt tokens, 128 generated, greedy: TTFT and decode tokens/s (median of 5)
    W2  16 concurrent streams of that shape: aggregate output tokens/s, p50/p99 TTFT, p50 inter-token latency
    W3  64 requests at once, 16 running at most (the rest queue): aggregate tokens/s, p99 end-to-end latency

Peers run in their own virtualenv (.venv-peers, `make peers`): Hugging Face transformers `generate()` (fp32,
static batches) and onnxruntime-genai (its own builder's fp32 and int4 models, generator API). Results go to
results/bench/bench.json and a markdown table printed for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from loadtests.workloads import OUTPUT_TOKENS, W1_REPEATS, W2_STREAMS, W3_REQUESTS, W3_RUNNING, median, pct, prompt

REPO = Path(__file__).resolve().parents[1]
PEERS_PY = REPO / ".venv-peers" / "bin" / "python"


# ---------------------------------------------------------------------------------------------------- ours


async def stream_one(client: httpx.AsyncClient, model: str, ids: list[int]) -> dict:
    body = {
        "model": model,
        "prompt": ids,
        "max_tokens": OUTPUT_TOKENS,
        "min_tokens": OUTPUT_TOKENS,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    times: list[float] = []
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            return {"ok": False, "error": f"HTTP {resp.status_code}"}
        async for line in resp.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0]["text"]:
                    times.append(time.perf_counter())
    end = time.perf_counter()
    ok = tokens == OUTPUT_TOKENS and bool(times)
    return {
        "ok": ok,
        "start": t0,
        "end": end,
        "ttft": times[0] - t0 if times else float("nan"),
        "gaps": list(np.diff(times)),
        "tokens": OUTPUT_TOKENS,
        "e2e": end - t0,
        "decode_tps": (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan"),
    }


async def run_ours(url: str) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        await stream_one(client, model, prompt(999))  # warm-up
        w1 = [await stream_one(client, model, prompt(i)) for i in range(W1_REPEATS)]
        w2 = await asyncio.gather(*(stream_one(client, model, prompt(100 + i)) for i in range(W2_STREAMS)))
        w3 = await asyncio.gather(*(stream_one(client, model, prompt(200 + i)) for i in range(W3_REQUESTS)))
    return {
        "W1": {"ttft_s": median([r["ttft"] for r in w1]), "decode_tps": median([r["decode_tps"] for r in w1])},
        "W2": aggregate(w2),
        "W3": {**aggregate(w3), "failures": sum(not r["ok"] for r in w3)},
    }


def aggregate(results: list[dict]) -> dict:
    ok = [r for r in results if r["ok"]]
    wall = max(r["end"] for r in ok) - min(r["start"] for r in ok)
    gaps = [g for r in ok for g in r["gaps"]]
    return {
        "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
        "ttft_p50_s": pct([r["ttft"] for r in ok], 50),
        "ttft_p99_s": pct([r["ttft"] for r in ok], 99),
        "itl_p50_s": median(gaps),
        "e2e_p99_s": pct([r["e2e"] for r in ok], 99),
        "failures": len(results) - len(ok),
    }


def serve(bundle: Path, threads: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "service",
        "--bundle",
        str(bundle),
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--max-num-seqs",
        str(W3_RUNNING),
        "--max-model-len",
        "512",
        "--intra-op-threads",
        str(threads),
    ]
    proc = subprocess.Popen(cmd, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    raise SystemExit(f"error: the service on {bundle} did not become ready")


def bench_ours(bundle: Path, threads: int) -> dict:
    proc, url = serve(bundle, threads)
    try:
        return asyncio.run(run_ours(url))
    finally:
        proc.terminate()
        proc.wait(30)


# ---------------------------------------------------------------------------------------------------- peers


def bench_peer(script: str, *args: str) -> dict | None:
    if not PEERS_PY.exists():
        print(f"skipping {script}: no .venv-peers (run `make peers`)", file=sys.stderr)
        return None
    result = subprocess.run(
        [str(PEERS_PY), str(REPO / "loadtests" / "peers" / script), *args], cwd=REPO, capture_output=True, text=True
    )
    if result.returncode != 0:
        print(f"{script} failed:\n{result.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ machine


def memory_bandwidth_gbs() -> float:
    """Read bandwidth, all cores: the best of 5 dot products of two 512 MiB vectors (bytes read / seconds)."""
    a = np.ones(2**27, dtype=np.float32)
    b = np.ones(2**27, dtype=np.float32)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return (a.nbytes + b.nbytes) / best / 1e9


def machine() -> dict:
    cpu = platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
    )
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem / 2**20, 1)}


def weight_bytes(bundle: Path) -> int:
    """Bytes a decode step reads: the graph's weights less the embedding table (a Gather reads one row of it)."""
    m = json.loads((bundle / "manifest.json").read_text())
    total = sum(v["bytes"] for k, v in m["files"].items() if k.startswith("model.onnx"))
    return total - m["model"]["vocab_size"] * m["model"]["d_model"] * 4


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.bench")
    p.add_argument("--bundle", type=Path, default=REPO / "bundles" / "smollm2-135m")
    p.add_argument("--int4-bundle", type=Path, default=REPO / "bundles" / "smollm2-135m-int4")
    p.add_argument("--out", type=Path, default=REPO / "results" / "bench")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--skip-peers", action="store_true")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
        "memory_read_gbs": memory_bandwidth_gbs(),
        "systems": {},
    }
    systems = report["systems"]
    systems["ours fp32"] = {**bench_ours(args.bundle, args.threads), "weight_bytes": weight_bytes(args.bundle)}
    print(json.dumps({"ours fp32": systems["ours fp32"]}), file=sys.stderr)
    if args.int4_bundle.exists():
        systems["ours int4"] = {
            **bench_ours(args.int4_bundle, args.threads),
            "weight_bytes": weight_bytes(args.int4_bundle),
        }
    if not args.skip_peers:
        hf_dir = args.out / "hf-smollm2"
        systems["transformers fp32"] = bench_peer("transformers_peer.py", "--hf-dir", str(hf_dir))
        for precision in ("fp32", "int4"):
            systems[f"onnxruntime-genai {precision}"] = bench_peer(
                "genai_peer.py",
                "--hf-dir",
                str(hf_dir),
                "--precision",
                precision,
                "--out",
                str(args.out / f"genai-{precision}"),
            )
    (args.out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    return 0


def table(report: dict) -> str:
    s, bw = report["systems"], report["memory_read_gbs"]
    rows = [
        "| system | W1 TTFT (ms) | W1 decode tok/s | W1 floor tok/s | W2 tok/s | W2 TTFT p50/p99 (ms) | "
        "W2 ITL p50 (ms) | W3 tok/s | W3 p99 e2e (s) | W3 failures |",
        "|" + "---|" * 10,
    ]
    for name, r in s.items():
        if not r:
            rows.append(f"| {name} | failed to run (see stderr) |" + " |" * 8)
            continue
        floor = f"{bw * 1e9 / r['weight_bytes']:.0f}" if r.get("weight_bytes") else ""
        w1, w2, w3 = r["W1"], r["W2"], r["W3"]
        rows.append(
            f"| {name} | {w1['ttft_s'] * 1e3:.0f} | {w1['decode_tps']:.1f} | {floor} | {w2['tokens_per_s']:.1f} | "
            f"{w2['ttft_p50_s'] * 1e3:.0f} / {w2['ttft_p99_s'] * 1e3:.0f} | {w2['itl_p50_s'] * 1e3:.1f} | "
            f"{w3['tokens_per_s']:.1f} | {w3['e2e_p99_s']:.2f} | {w3.get('failures', 0)} |"
        )

    def ratio(a: str, b: str, w: str, k: str) -> str:
        if s.get(a) and s.get(b):
            return f"{s[a][w][k] / s[b][w][k]:.2f}x"
        return "n/a"

    rows += ["", "| ratio (ours / peer) | W1 decode | W1 TTFT | W2 tok/s |", "|---|---|---|---|"]
    for peer, mine in (
        ("transformers fp32", "ours fp32"),
        ("onnxruntime-genai fp32", "ours fp32"),
        ("onnxruntime-genai int4", "ours int4"),
    ):
        rows.append(
            f"| {mine} / {peer} | {ratio(mine, peer, 'W1', 'decode_tps')} | "
            f"{ratio(mine, peer, 'W1', 'ttft_s')} | {ratio(mine, peer, 'W2', 'tokens_per_s')} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
