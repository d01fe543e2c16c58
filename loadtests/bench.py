"""`make bench`: W1/W2/W3 for our service (HTTP, streaming) and for the peers on the same weights, in one run.

    W1  one stream, 128 prompt tokens, 128 generated, greedy: TTFT and decode tokens/s (median of 5)
    W2  16 concurrent streams of that shape: aggregate output tokens/s, p50/p99 TTFT, p50 inter-token latency
    W3  64 requests at once, 16 running at most (the rest queue): aggregate tokens/s, p99 end-to-end latency
    W4  a chat service: 16 users at once, 4 requests each one after another, each the same 1,000-token system
        prompt + a 32-token turn, 64 tokens answered: TTFT p50/p99 (ours with and without the prefix cache)

llama.cpp's `llama-server` (built by loadtests/peers/build_llama_server.sh from the llama-cpp-python sdist) serves
the default model's own GGUF (Q4_1) and an F32 GGUF converted from it with `llama-quantize`, and is measured by
the same HTTP client on the same workloads. The other peers run in their own virtualenv (.venv-peers, `make
peers`): Hugging Face transformers `generate()` (fp32, static batches) and onnxruntime-genai (its own builder's
fp32 and int4 models, generator API, in-process); against them our engine's W1 runs in-process too ("engine
in-process": no HTTP, no scheduler). Results go to results/bench/bench.json and a markdown table printed for
docs/BENCHMARKS.md. The full run ends with W1 again, ours and llama.cpp alternating (`--w1-alternating N` rounds,
3 by default; each round's read bandwidth probed before it): a single stream's decode follows the machine's read
bandwidth from minute to minute, and the full run measures each system once, minutes apart; the rounds' medians
join the ratio table. `--budget-curve 256,512,...` instead runs W2 on ours (fp32) once per token budget;
`--w1-rounds N` / `--w2-rounds N` one workload, ours and llama.cpp alternating; `--w4-rounds N` W4, ours with and
without the prefix cache and llama.cpp. `--device cuda --bundle bundles/smollm2-135m-fp16 --int4-bundle none
--skip-peers` runs ours on a GPU (the row is named by the bundle's precision and the device; the card is recorded),
its decode steps from CUDA graphs unless `--no-cuda-graphs`, their logits reduced on the device unless
`--no-reduce-logits`.
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

from loadtests.workloads import (
    CHAT_OUTPUT_TOKENS,
    CHAT_ROUNDS,
    CHAT_USERS,
    OUTPUT_TOKENS,
    PROMPT_TOKENS,
    W1_REPEATS,
    W2_STREAMS,
    W3_REQUESTS,
    W3_RUNNING,
    chat_prompt,
    median,
    pct,
    prompt,
    stalls,
)
from service.config import HUGE_PAGES, huge_pages

REPO = Path(__file__).resolve().parents[1]
PEERS_PY = REPO / ".venv-peers" / "bin" / "python"
LLAMA_BIN = REPO / ".cache" / "llama.cpp" / "bin"
MAX_MODEL_LEN = 1280  # W4's 1,032 prompt + 64 answer tokens fit; the same for every system


# ---------------------------------------------------------------------------------------------------- ours


async def stream_one(client: httpx.AsyncClient, model: str, ids: list[int], output: int = OUTPUT_TOKENS) -> dict:
    body = {
        "model": model,
        "prompt": ids,
        "max_tokens": output,
        "min_tokens": output,
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
    tokens = tokens or len(times)  # a server that sends no usage chunk: one chunk per token
    ok = tokens == output and bool(times)
    # Decode rate by tokens, not chunks: a server holds back a token that ends inside a UTF-8 character (both ours
    # and llama-server do), so an output of multi-token characters arrives in fewer chunks than tokens.
    return {
        "ok": ok,
        "start": t0,
        "end": end,
        "ttft": times[0] - t0 if times else float("nan"),
        "gaps": list(np.diff(times)),
        "tokens": output,
        "e2e": end - t0,
        "decode_tps": (tokens - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan"),
    }


async def run_workloads(url: str, which: tuple[str, ...] = ("W1", "W2", "W3", "W4")) -> dict:
    """The workloads against any OpenAI-compatible completions server (ours, llama-server), same client."""
    out: dict = {}
    # A new connection per request: llama-server closes idle keep-alive connections that the pool would reuse.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        await stream_one(client, model, prompt(999))  # warm-up
        if "W1" in which:
            w1 = [await stream_one(client, model, prompt(i)) for i in range(W1_REPEATS)]
            out["W1"] = {"ttft_s": median([r["ttft"] for r in w1]), "decode_tps": median([r["decode_tps"] for r in w1])}
        if "W2" in which:
            out["W2"] = aggregate(
                await asyncio.gather(*(stream_one(client, model, prompt(100 + i)) for i in range(W2_STREAMS)))
            )
        if "W3" in which:
            out["W3"] = aggregate(
                await asyncio.gather(*(stream_one(client, model, prompt(200 + i)) for i in range(W3_REQUESTS)))
            )
        if "W4" in which:

            async def user(u: int) -> list[dict]:
                return [
                    await stream_one(client, model, chat_prompt(u, r), CHAT_OUTPUT_TOKENS) for r in range(CHAT_ROUNDS)
                ]

            rounds = await asyncio.gather(*(user(u) for u in range(CHAT_USERS)))  # [user][round]
            out["W4"] = {
                **aggregate([r for rs in rounds for r in rs]),
                "ttft_p50_first_round_s": median([rs[0]["ttft"] for rs in rounds]),
                "ttft_p50_later_rounds_s": median([r["ttft"] for rs in rounds for r in rs[1:]]),
            }
    return out


def aggregate(results: list[dict]) -> dict:
    ok = [r for r in results if r["ok"]]
    t0 = min(r["start"] for r in ok)
    wall = max(r["end"] for r in ok) - t0
    gaps = [g for r in ok for g in r["gaps"]]
    return {
        "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
        "ttft_p50_s": pct([r["ttft"] for r in ok], 50),
        "ttft_p99_s": pct([r["ttft"] for r in ok], 99),
        "itl_p50_s": median(gaps),
        "itl_p99_s": pct(gaps, 99),
        "e2e_p99_s": pct([r["e2e"] for r in ok], 99),
        "failures": len(results) - len(ok),
        # what explains a p99 (a stall that many streams waited out, a burst the server took in parts): how many
        # gaps were over 3x the median, and each request's first token (from the first request's start) and its
        # longest gap, in the order their first tokens came
        "gaps": len(gaps),
        "gaps_over_3x_median": int(stalls(gaps)),
        "first_token_and_longest_gap_s": sorted(
            [round(r["start"] + r["ttft"] - t0, 4), round(max(r["gaps"], default=0.0), 4)] for r in ok
        ),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, url: str, path: str, what: str) -> None:
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"error: {what} exited with {proc.returncode}")
        try:
            if httpx.get(url + path, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"error: {what} did not become ready")


def serve(bundle: Path, threads: int, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
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
        str(MAX_MODEL_LEN),
        "--intra-op-threads",
        str(threads),
        *extra,
    ]
    proc = subprocess.Popen(cmd, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, url, "/ready", f"the service on {bundle}")
    return proc, url


def bench_ours(bundle: Path, threads: int, *extra: str, which: tuple[str, ...] = ("W1", "W2", "W3", "W4")) -> dict:
    proc, url = serve(bundle, threads, *extra)
    try:
        return asyncio.run(run_workloads(url, which))
    finally:
        proc.terminate()
        proc.wait(30)


def engine_w1(bundle: Path, threads: int, device: str) -> dict:
    """W1 through our engine alone, in-process (no HTTP, no scheduler), as onnxruntime-genai's generator runs its W1
    in-process too: W1_REPEATS prompts of PROMPT_TOKENS, each prefilled then decoded greedily with a host argmax
    (loadtests.engine's drive, one row)."""
    from loadtests.engine import drive
    from service.bundle import load_bundle
    from service.engine import Engine

    b = load_bundle(bundle)
    engine = Engine(b, 1, PROMPT_TOKENS + OUTPUT_TOKENS + 1, device, threads)
    drive(engine, b.vocab_size, 1, PROMPT_TOKENS, 8)  # warm-up
    runs = [drive(engine, b.vocab_size, 1, PROMPT_TOKENS, OUTPUT_TOKENS - 1) for _ in range(W1_REPEATS)]
    steps = [t for _, times in runs for t in times]
    return {"W1": {"ttft_s": median([prefills[0] for prefills, _ in runs]), "decode_tps": 1 / median(steps)}}


# ---------------------------------------------------------------------------------------------------- llama.cpp


def llama_f32_gguf(q4: Path, out: Path) -> Path:
    """The default GGUF dequantized to F32 by llama.cpp's own llama-quantize (the same weights, unquantized)."""
    f32 = out / "smollm2-135m-f32.gguf"
    if not f32.exists():
        cmd = [str(LLAMA_BIN / "llama-quantize"), "--allow-requantize", str(q4), str(f32), "F32"]
        subprocess.run(cmd, check=True, capture_output=True)
    return f32


def bench_llama(gguf: Path, threads: int, which: tuple[str, ...] = ("W1", "W2", "W4")) -> dict:
    """llama-server with 16 parallel slots of MAX_MODEL_LEN each, prompt cache reuse on, this machine's cores."""
    port = free_port()
    t = str(threads or os.cpu_count() or 1)
    cmd = [str(LLAMA_BIN / "llama-server"), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["-np", str(W3_RUNNING), "-c", str(W3_RUNNING * MAX_MODEL_LEN), "-t", t, "-tb", t, "--cache-reuse", "256"]
    cmd += ["--threads-http", str(W3_REQUESTS + 8)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url, "/health", f"llama-server on {gguf.name}")
        return asyncio.run(run_workloads(url, which))  # not W3 by default: 64 at once, beyond its slots
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


def memory_bandwidth_gbs(threads: int = 0) -> float:
    """Read bandwidth, all cores: the best of 5 passes of `threads` threads (0: one a core), each taking the maximum
    of its share of a 1 GiB float32 array (numpy's vectorized max keeps up with memory and lets go of the GIL; a dot
    product of two vectors, this probe before, ran on one core: 18-22 GB/s where two read 27-32 on a 2-core Zen 3,
    so a "floor" from it sat below what both servers reached)."""
    from concurrent.futures import ThreadPoolExecutor

    threads = threads or os.cpu_count() or 1
    a = np.ones(2**28, dtype=np.float32)
    n = a.size // threads
    parts = [a[i * n : (i + 1) * n] for i in range(threads)]
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(5):
            t = time.perf_counter()
            list(pool.map(np.max, parts))
            best = min(best, time.perf_counter() - t)
    return a.nbytes / best / 1e9


SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")


def run_header() -> dict:
    """What every results file starts with: machine, date, and the command (the module, not this checkout's path)."""
    command = " ".join(["python -m loadtests.bench", *sys.argv[1:]])
    return {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "command": command}


def machine() -> dict:
    info = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines())
    info = {k.strip(): v.strip() for k, v in info.items()}  # the first processor's fields
    cpu = info.get("model name", platform.machine())
    flags = [f for f in info.get("flags", "").split() if f in SIMD_FLAGS]
    mem = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
    )
    gpu = ""
    try:  # the card, where there is one (nvidia-smi ships with the driver)
        query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
        gpu = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        pass
    return {"cpu": cpu, "flags": flags, "cores": os.cpu_count(), "memory_gib": round(mem / 2**20, 1), "gpu": gpu}


def ours_label(bundle: Path, device: str) -> str:
    """The row name: the bundle's precision, and the device where it is not the CPU ("ours fp16 (cuda)")."""
    m = json.loads((bundle / "manifest.json").read_text())
    precision = m["dtype"] if m["quantization"] == "none" else m["quantization"].split()[0]
    return f"ours {precision}" + (f" ({device})" if device != "cpu" else "")


def weight_bytes(bundle: Path) -> int:
    """Bytes a decode step reads: the graph's weights, less an untied input embedding table (its Gather reads one
    row). A tied table is read whole every step, by the unembedding."""
    m = json.loads((bundle / "manifest.json").read_text())
    total = sum(v["bytes"] for k, v in m["files"].items() if k.startswith("model.onnx"))
    if m["model"]["tie_embeddings"]:
        return total
    return total - m["model"]["vocab_size"] * m["model"]["d_model"] * 4  # the fp32 input table


# ---------------------------------------------------------------------------------------------------- main


def with_huge_pages() -> None:
    """Runs this command again with malloc's huge pages on (GLIBC_TUNABLES), unless they are: every system measured
    here, ours in-process and served and the peers, then runs as `make serve` and the image run the service."""
    if sys.platform == "linux" and not huge_pages(os.environ):
        env = {**os.environ, "GLIBC_TUNABLES": ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"), HUGE_PAGES]))}
        os.execve(sys.executable, sys.orig_argv, env)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.bench")
    p.add_argument("--bundle", type=Path, default=REPO / "bundles" / "smollm2-135m")
    p.add_argument("--int4-bundle", type=Path, default=REPO / "bundles" / "smollm2-135m-int4")
    p.add_argument("--out", type=Path, default=REPO / "results" / "bench")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="ours: the service's --device")
    p.add_argument(
        "--cuda-graphs", action=argparse.BooleanOptionalAction, default=True, help="ours: the service's --cuda-graphs"
    )
    p.add_argument(
        "--reduce-logits", action=argparse.BooleanOptionalAction, default=True, help="ours: the service's flag"
    )
    p.add_argument("--skip-peers", action="store_true")
    p.add_argument("--budget-curve", help="comma-separated --max-num-batched-tokens values: W2 on ours fp32 per value")
    p.add_argument("--w1-rounds", type=int, help="W1 only, ours and llama.cpp alternating, this many rounds")
    p.add_argument("--w2-rounds", type=int, help="W2 only, ours and llama.cpp alternating, this many rounds")
    p.add_argument(
        "--w1-alternating",
        type=int,
        default=3,
        help="the full run: after it, this many rounds of W1 with ours and llama.cpp alternating (0: none)",
    )
    p.add_argument(
        "--w4-rounds", type=int, help="W4 only: ours with and without the prefix cache and llama.cpp, alternating"
    )
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.budget_curve:
        return budget_curve(args, [int(b) for b in args.budget_curve.split(",")])
    if args.w1_rounds:
        return alternating_rounds(args, args.w1_rounds, "W1")
    if args.w2_rounds:
        return alternating_rounds(args, args.w2_rounds, "W2")
    if args.w4_rounds:
        return w4_rounds(args, args.w4_rounds)
    report: dict = {
        **run_header(),
        "memory_read_gbs": memory_bandwidth_gbs(args.threads),
        "device": args.device,
        "systems": {},
    }
    systems = report["systems"]
    dev = (
        "--device",
        args.device,
        *([] if args.cuda_graphs else ["--no-cuda-graphs"]),
        *([] if args.reduce_logits else ["--no-reduce-logits"]),
    )
    for bundle, no_cache_too in ((args.bundle, True), (args.int4_bundle, False)):
        if not bundle.exists():
            continue
        plain = not args.cuda_graphs and args.device == "cuda"
        name = ours_label(bundle, args.device) + (" no graphs" if plain else "")
        name += " unreduced logits" if args.device == "cuda" and not args.reduce_logits else ""
        systems[name] = {**bench_ours(bundle, args.threads, *dev), "weight_bytes": weight_bytes(bundle)}
        if no_cache_too:
            systems[name]["W4 without prefix cache"] = bench_ours(
                bundle, args.threads, *dev, "--no-prefix-cache", which=("W4",)
            )["W4"]
        print(json.dumps({name: systems[name]}), file=sys.stderr)
        if args.device == "cpu":  # against the in-process peers: W1 without HTTP
            systems[f"{name}, engine in-process"] = engine_w1(bundle, args.threads, args.device)
    if (LLAMA_BIN / "llama-server").exists():
        from export.checkpoints import default_gguf_path

        q4 = default_gguf_path()
        systems["llama.cpp F32"] = bench_llama(llama_f32_gguf(q4, args.out), args.threads)
        print(json.dumps({"llama.cpp F32": systems["llama.cpp F32"]}), file=sys.stderr)
        systems["llama.cpp Q4_1"] = bench_llama(q4, args.threads)
        print(json.dumps({"llama.cpp Q4_1": systems["llama.cpp Q4_1"]}), file=sys.stderr)
    else:
        print("skipping llama.cpp: run loadtests/peers/build_llama_server.sh", file=sys.stderr)
    if (LLAMA_BIN / "llama-server").exists() and args.device == "cpu" and args.w1_alternating:
        # W1 again, ours and llama.cpp alternating: the full run measures each system once, minutes apart, and a
        # single stream's decode moves with the machine's read bandwidth from minute to minute
        report["w1_alternating"], report["w1_alternating_rows"] = run_alternating(args, args.w1_alternating, "W1")
        print("\n".join(report["w1_alternating_rows"]), file=sys.stderr)
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


def budget_curve(args: argparse.Namespace, budgets: list[int]) -> int:
    """W2 on ours (fp32) once per token budget, one server each, in one run: the curve behind the default."""
    report: dict = run_header()
    rows = ["| --max-num-batched-tokens | W2 tok/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) |", "|---|---|---|---|"]
    for b in budgets:
        w2 = bench_ours(args.bundle, args.threads, "--max-num-batched-tokens", str(b), which=("W2",))["W2"]
        report[str(b)] = w2
        rows.append(
            f"| {b} | {w2['tokens_per_s']:.1f} | {w2['ttft_p50_s'] * 1e3:.0f} / {w2['ttft_p99_s'] * 1e3:.0f} | "
            f"{w2['itl_p50_s'] * 1e3:.1f} / {w2['itl_p99_s'] * 1e3:.1f} |"
        )
        print(rows[-1], file=sys.stderr)
    (args.out / "budget-curve.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n".join(rows))
    return 0


# What each alternating round reads from a workload's result: (key, label, scale to the printed unit)
ROUND_FIGURES = {
    "W1": (("decode_tps", "decode tok/s", 1.0), ("ttft_s", "TTFT ms", 1e3)),
    "W2": (("tokens_per_s", "tok/s", 1.0), ("ttft_p50_s", "TTFT p50 ms", 1e3), ("itl_p99_s", "ITL p99 ms", 1e3)),
}


def alternating_rounds(args: argparse.Namespace, rounds: int, workload: str) -> int:
    """One workload alone, ours and llama.cpp alternating in each precision, `rounds` times: ratios that the
    machine's drift between the systems' turns in a full run does not skew. Medians over the rounds."""
    report, rows = run_alternating(args, rounds, workload)
    (args.out / f"{workload.lower()}-rounds.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n".join(rows))
    return 0


def run_alternating(args: argparse.Namespace, rounds: int, workload: str) -> tuple[dict, list[str]]:
    """`alternating_rounds`' measurements -> (the report, its markdown rows: each round, then the medians)."""
    from export.checkpoints import default_gguf_path

    q4 = default_gguf_path()
    pairs = {
        "fp32": (args.bundle, llama_f32_gguf(q4, args.out)),
        "int4": (args.int4_bundle, q4),
    }
    pairs = {precision: pair for precision, pair in pairs.items() if pair[0].exists()}  # (--int4-bundle none)
    figures = ROUND_FIGURES[workload]
    labels = ", ".join(label for _, label, _ in figures)
    report: dict = {**run_header(), "workload": workload}
    rows = [f"| round | precision | ours: {labels} | llama.cpp: {labels} |", "|---" * 4 + "|"]

    def cell(w: dict) -> str:
        return " / ".join(f"{w[key] * scale:.1f}" for key, _, scale in figures)

    if workload == "W1":  # each round's read bandwidth, probed just before it: the floor it had
        rows[0] += " read GB/s | ours / llama.cpp, % of the floor |"
        rows[1] += "---|---|"
    for r in range(rounds):
        for precision, (bundle, gguf) in pairs.items():
            gbs = memory_bandwidth_gbs(args.threads) if workload == "W1" else None
            ours = bench_ours(bundle, args.threads, which=(workload,))[workload]
            peer = bench_llama(gguf, args.threads, which=(workload,))[workload]
            report.setdefault(precision, []).append({"ours": ours, "llama.cpp": peer, "memory_read_gbs": gbs})
            rows.append(f"| {r + 1} | {precision} | {cell(ours)} | {cell(peer)} |")
            if gbs:  # tokens/s over the floor's: bytes a step reads / bandwidth
                pct = [
                    w["decode_tps"] * n / (gbs * 1e9) * 100
                    for w, n in ((ours, weight_bytes(bundle)), (peer, gguf.stat().st_size))
                ]
                rows[-1] += f" {gbs:.1f} | {pct[0]:.0f}% / {pct[1]:.0f}% |"
            print(rows[-1], file=sys.stderr)
    for precision in pairs:
        runs = report[precision]
        ratios = []
        for key, label, _ in figures:  # the ratio of the medians, and the median of each round's own ratio
            ours_m, peer_m = (median([x[side][key] for x in runs]) for side in ("ours", "llama.cpp"))
            paired = median([x["ours"][key] / x["llama.cpp"][key] for x in runs])
            ratios.append(f"{label.removesuffix(' ms')} {ours_m / peer_m:.2f}x ({paired:.2f}x)")
        rows.append(f"| median | {precision} | {', '.join(ratios)} of llama.cpp (median of the rounds' ratios) | |")
        report.setdefault("medians", {})[precision] = {
            key: {side: median([x[side][key] for x in runs]) for side in ("ours", "llama.cpp")} for key, _, _ in figures
        }
    return report, rows


def w4_rounds(args: argparse.Namespace, rounds: int) -> int:
    """W4 alone, in each precision: ours with the prefix cache, ours without it and llama.cpp (its slot prompt cache
    on, as a user runs it), one after another, `rounds` times. Medians of TTFT p50 over the rounds, and each round's
    own ratios."""
    from export.checkpoints import default_gguf_path

    q4 = default_gguf_path()
    pairs = {"fp32": (args.bundle, llama_f32_gguf(q4, args.out)), "int4": (args.int4_bundle, q4)}
    report: dict = {**run_header(), "workload": "W4"}
    rows = [
        "| round | precision | ours TTFT p50 / p99 (ms) | ours, --no-prefix-cache | llama.cpp | cache on / off | "
        "ours / llama.cpp |",
        "|---" * 7 + "|",
    ]
    for r in range(rounds):
        for precision, (bundle, gguf) in pairs.items():
            on = bench_ours(bundle, args.threads, which=("W4",))["W4"]
            off = bench_ours(bundle, args.threads, "--no-prefix-cache", which=("W4",))["W4"]
            peer = bench_llama(gguf, args.threads, which=("W4",))["W4"]
            report.setdefault(precision, []).append({"ours": on, "ours without prefix cache": off, "llama.cpp": peer})
            cells = [_ms(w, "ttft_p50_s", "ttft_p99_s") for w in (on, off, peer)]
            ratios = f"{on['ttft_p50_s'] / off['ttft_p50_s']:.2f}x | {on['ttft_p50_s'] / peer['ttft_p50_s']:.2f}x"
            rows.append(f"| {r + 1} | {precision} | {' | '.join(cells)} | {ratios} |")
            print(rows[-1], file=sys.stderr)
    for precision in pairs:
        runs = report[precision]
        p50 = {k: median([x[k]["ttft_p50_s"] for x in runs]) for k in runs[0]}
        mine, off, peer = p50["ours"], p50["ours without prefix cache"], p50["llama.cpp"]
        rows.append(
            f"| median | {precision} | {mine * 1e3:.0f} | {off * 1e3:.0f} | {peer * 1e3:.0f} | {mine / off:.2f}x | "
            f"{mine / peer:.2f}x |"
        )
    (args.out / "w4-rounds.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n".join(rows))
    return 0


def _ms(w: dict | None, a: str, b: str) -> str:
    return f"{w[a] * 1e3:.0f} / {w[b] * 1e3:.0f}" if w else ""


def table(report: dict) -> str:
    s, bw, m = report["systems"], report["memory_read_gbs"], report["machine"]
    on_gpu = report.get("device", "cpu") != "cpu"
    rows = [
        f"{report['date']}, {m['cores']} x {m['cpu']} ({', '.join(m['flags'])}), {m['memory_gib']} GiB, "
        f"read bandwidth {bw:.1f} GB/s" + (f"; GPU {m['gpu']}" if m.get("gpu") else ""),
        "",
        "| system | W1 TTFT (ms) | W1 decode tok/s | W1 floor tok/s | W2 tok/s | W2 TTFT p50/p99 (ms) | "
        "W2 ITL p50/p99 (ms) | W3 tok/s | W3 p99 e2e (s) | W4 TTFT p50/p99 (ms) |",
        "|" + "---|" * 10,
    ]
    for name, r in s.items():
        if not r:
            rows.append(f"| {name} | failed to run (see stderr) |" + " |" * 8)
            continue
        floor = f"{bw * 1e9 / r['weight_bytes']:.0f}" if r.get("weight_bytes") and not on_gpu else ""
        if "W2" not in r:  # W1 alone (our engine in-process)
            rows.append(f"| {name} | {r['W1']['ttft_s'] * 1e3:.0f} | {r['W1']['decode_tps']:.1f} |" + " |" * 7)
            continue
        w1, w2, w3 = r["W1"], r["W2"], r.get("W3") or {"tokens_per_s": float("nan"), "e2e_p99_s": float("nan")}
        itl = f"{w2['itl_p50_s'] * 1e3:.1f} / {w2['itl_p99_s'] * 1e3:.1f}" if "itl_p99_s" in w2 else ""
        rows.append(
            f"| {name} | {w1['ttft_s'] * 1e3:.0f} | {w1['decode_tps']:.1f} | {floor} | {w2['tokens_per_s']:.1f} | "
            f"{_ms(w2, 'ttft_p50_s', 'ttft_p99_s')} | {itl} | {w3['tokens_per_s']:.1f} | {w3['e2e_p99_s']:.2f} | "
            f"{_ms(r.get('W4'), 'ttft_p50_s', 'ttft_p99_s')} |"
        )
        if r.get("W4 without prefix cache"):
            no_cache = _ms(r["W4 without prefix cache"], "ttft_p50_s", "ttft_p99_s")
            rows.append(f"| {name}, --no-prefix-cache | | | | | | | | | {no_cache} |")

    def ratio(a: str, b: str, w: str, k: str) -> str:
        x, y = (s.get(a) or {}).get(w) or {}, (s.get(b) or {}).get(w) or {}
        return f"{x[k] / y[k]:.2f}x" if k in x and k in y else "n/a"  # the static-batch peers have no W2 ITL

    rows += [
        "",
        "| ratio (ours / peer) | W1 decode | W1 TTFT | W2 tok/s | W2 TTFT p50 | W2 ITL p99 | W4 TTFT p50 |",
        "|---|---|---|---|---|---|---|",
    ]
    for peer, mine in (
        ("llama.cpp F32", "ours fp32"),
        ("llama.cpp Q4_1", "ours int4"),
        ("transformers fp32", "ours fp32"),
        ("onnxruntime-genai fp32", "ours fp32"),
        ("onnxruntime-genai int4", "ours int4"),
        ("onnxruntime-genai fp32", "ours fp32, engine in-process"),
        ("onnxruntime-genai int4", "ours int4, engine in-process"),
    ):
        if not s.get(peer) or not s.get(mine):
            continue
        rows.append(
            f"| {mine} / {peer} | {ratio(mine, peer, 'W1', 'decode_tps')} | {ratio(mine, peer, 'W1', 'ttft_s')} | "
            f"{ratio(mine, peer, 'W2', 'tokens_per_s')} | {ratio(mine, peer, 'W2', 'ttft_p50_s')} | "
            f"{ratio(mine, peer, 'W2', 'itl_p99_s')} | {ratio(mine, peer, 'W4', 'ttft_p50_s')} |"
        )
    alt = report.get("w1_alternating", {}).get("medians", {})
    for precision, peer in (("fp32", "llama.cpp F32"), ("int4", "llama.cpp Q4_1")):
        if precision in alt:
            m = alt[precision]
            decode = m["decode_tps"]["ours"] / m["decode_tps"]["llama.cpp"]
            ttft = m["ttft_s"]["ours"] / m["ttft_s"]["llama.cpp"]
            rows.append(f"| ours {precision} / {peer}, W1 alternating | {decode:.2f}x | {ttft:.2f}x | | | | |")
    if report.get("w1_alternating_rows"):
        rows += [
            "",
            "W1, ours and llama.cpp alternating (medians over the rounds):",
            "",
            *report["w1_alternating_rows"],
        ]
    for name, r in s.items():
        if r and r.get("W4 without prefix cache"):
            on, off = r["W4"]["ttft_p50_s"], r["W4 without prefix cache"]["ttft_p50_s"]
            rows.append(f"\nW4 TTFT p50, prefix cache on / off ({name}): {on / off:.2f}x")
    return "\n".join(rows)


if __name__ == "__main__":
    with_huge_pages()
    sys.exit(main())
