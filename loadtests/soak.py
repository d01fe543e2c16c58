"""`make soak`: steady locust load for SOAK_MINUTES (10) against a service this script starts on the default bundle.

Passes when no request failed and the server's resident memory after the run is within 5% of what it was after a
one-minute warm-up. Writes results/soak/summary.json and prints one line for docs/RELIABILITY.md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

from loadtests.run import REPO, machine, run_locust, start_service


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.soak")
    p.add_argument("--minutes", type=float, default=float(os.environ.get("SOAK_MINUTES", "10")))
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--bundle", default=str(REPO / "bundles" / "smollm2-135m"))
    p.add_argument("--out", type=Path, default=REPO / "results" / "soak")
    args = p.parse_args(argv)
    os.environ.setdefault("LOADTEST_OUTPUT_TOKENS", "64")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        host = f"http://127.0.0.1:{s.getsockname()[1]}"
    proc = start_service(host, args.bundle)
    try:
        warm = run_locust(host, args.users, args.users, "60s", args.out / "warmup")
        before = rss_bytes(proc.pid)
        started = time.time()
        steady = run_locust(host, args.users, args.users, f"{int(args.minutes * 60)}s", args.out / "steady")
        after = rss_bytes(proc.pid)
    finally:
        proc.terminate()
        proc.wait(60)
    growth = (after - before) / before
    summary = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "minutes": args.minutes,
        "users": args.users,
        "requests": steady["requests"],
        "failures": steady["failures"] + warm["failures"],
        "rss_after_warmup_mib": round(before / 2**20, 1),
        "rss_after_run_mib": round(after / 2**20, 1),
        "rss_growth_pct": round(100 * growth, 2),
        "output_tokens_per_s": steady["output_tokens_per_s"],
        "ttft_p99_ms": steady["ttft"].get("p99_ms"),
        "itl_p99_ms": steady["itl"].get("p99_ms"),
        "elapsed_s": round(time.time() - started, 1),
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    ok = summary["failures"] == 0 and growth < 0.05
    print(
        "soak: " + ("passed" if ok else "FAILED") + f" ({summary['failures']} failed requests, "
        f"RSS {summary['rss_after_warmup_mib']} -> {summary['rss_after_run_mib']} MiB, {summary['rss_growth_pct']}%)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
