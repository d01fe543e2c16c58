"""Headless locust run against a service: CSV + HTML report + summary.json under a results folder.

    python -m loadtests.run --host http://127.0.0.1:8000 --users 16 --spawn-rate 16 --duration 60s --out results/x

Starts a service on the default bundle when nothing answers at --host (and stops it afterwards).
`--sweep 1,2,4,8,16,32` runs one measurement per concurrency and draws the plots (loadtests/plot.py).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import urlopen

REPO = Path(__file__).resolve().parents[1]


def answers(host: str) -> bool:
    try:
        with urlopen(host + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def start_service(host: str, bundle: str, *extra: str) -> subprocess.Popen:
    u = urlparse(host)
    cmd = [
        sys.executable,
        "-m",
        "service",
        "--bundle",
        bundle,
        "--host",
        u.hostname or "127.0.0.1",
        "--port",
        str(u.port or 8000),
        "--log-level",
        "warning",
        *extra,
    ]
    proc = subprocess.Popen(cmd, cwd=REPO)
    for _ in range(600):
        if answers(host):
            return proc
        if proc.poll() is not None:
            raise SystemExit(f"error: the service exited with {proc.returncode}")
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("error: the service did not become healthy in 300s")


def run_locust(host: str, users: int, spawn_rate: float, duration: str, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(REPO / "loadtests" / "locustfile.py"),
        "--headless",
        "--host",
        host,
        "-u",
        str(users),
        "-r",
        str(spawn_rate),
        "-t",
        duration,
        "--csv",
        str(out / "locust"),
        "--html",
        str(out / "report.html"),
        "--only-summary",
        "--stop-timeout",
        "120",
    ]
    started = time.time()
    result = subprocess.run(
        cmd,
        cwd=REPO,
        env={**os.environ},
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=_seconds(duration) + 300,
    )
    elapsed = time.time() - started
    (out / "locust.log").write_text(result.stdout + result.stderr)
    summary = summarize(out / "locust_stats.csv", elapsed)
    summary.update(
        users=users,
        host=host,
        duration=duration,
        machine=machine(),
        prompt_tokens_per_request=int(os.environ.get("LOADTEST_PROMPT_TOKENS", "128")),
        output_tokens_per_request=int(os.environ.get("LOADTEST_OUTPUT_TOKENS", "128")),
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _seconds(duration: str) -> float:
    """locust's run-time syntax: 90, 90s, 5m, 1h30m."""
    total, number = 0.0, ""
    for ch in duration:
        if ch.isdigit():
            number += ch
        else:
            total += int(number or 0) * {"s": 1, "m": 60, "h": 3600}[ch]
            number = ""
    return total + int(number or 0)


def summarize(stats_csv: Path, elapsed: float) -> dict:
    rows = list(csv.DictReader(stats_csv.open()))
    by_type: dict[str, dict] = {}
    failures = 0
    for r in rows:
        if r["Name"] == "Aggregated":
            continue
        if r["Type"] == "POST":
            failures += int(r["Failure Count"])
        by_type.setdefault(r["Type"], r)

    def pct(kind: str) -> dict:
        r = by_type.get(kind)
        if r is None:
            return {}
        return {
            "p50_ms": float(r["50%"]),
            "p90_ms": float(r["90%"]),
            "p99_ms": float(r["99%"]),
            "count": int(r["Request Count"]),
        }

    e2e = by_type.get("E2E")
    tokens = int(e2e["Request Count"]) * float(e2e["Average Content Size"]) if e2e else 0.0
    return {
        "ttft": pct("TTFT"),
        "itl": pct("ITL"),
        "latency": pct("E2E"),
        "requests": int(by_type["POST"]["Request Count"]) if "POST" in by_type else 0,
        "failures": failures,
        "output_tokens": int(tokens),
        "elapsed_s": round(elapsed, 1),
        "output_tokens_per_s": round(tokens / elapsed, 2) if elapsed else 0.0,
    }


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.run")
    p.add_argument("--host", default="http://127.0.0.1:8000")
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--spawn-rate", type=float, default=16)
    p.add_argument("--duration", default="60s")
    p.add_argument("--out", type=Path, default=REPO / "results" / time.strftime("loadtest-%Y%m%d-%H%M%S"))
    p.add_argument("--bundle", default=str(REPO / "bundles" / "smollm2-135m"))
    p.add_argument("--sweep", default="", help="comma-separated concurrencies: one run each, then plots")
    args = p.parse_args(argv)
    proc = None if answers(args.host) else start_service(args.host, args.bundle)
    try:
        if args.sweep:
            results = []
            for users in [int(u) for u in args.sweep.split(",")]:
                s = run_locust(args.host, users, users, args.duration, args.out / f"u{users}")
                print(json.dumps({k: s[k] for k in ("users", "output_tokens_per_s", "ttft", "itl", "failures")}))
                results.append(s)
            from loadtests.plot import plot_sweep

            plot_sweep(results, args.out, title=f"{Path(args.bundle).name} on {machine()}")
        else:
            s = run_locust(args.host, args.users, args.spawn_rate, args.duration, args.out)
            print(json.dumps(s, indent=2))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
