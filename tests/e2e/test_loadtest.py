"""The locust users and the headless runner against a real server: entries for TTFT/ITL/E2E, no failures."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.helpers import run_cli

pytestmark = pytest.mark.e2e


def test_headless_locust_run_writes_reports_and_summary(tiny_server, tmp_path):
    if importlib.util.find_spec("locust") is None:  # not imported here: locust monkey-patches the process
        pytest.skip("locust is not installed")
    result = run_cli(
        "loadtests.run",
        "--host",
        tiny_server.url,
        "--users",
        "2",
        "--spawn-rate",
        "2",
        "--duration",
        "6s",
        "--out",
        str(tmp_path / "lt"),
        env={"LOADTEST_PROMPT_TOKENS": "16", "LOADTEST_OUTPUT_TOKENS": "8"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "lt" / "summary.json").read_text())
    assert summary["requests"] > 0 and summary["failures"] == 0
    # streams still open when the run stops have a TTFT entry but no end-to-end one (at most one per user)
    assert 0 < summary["latency"]["count"] <= summary["ttft"]["count"] <= summary["latency"]["count"] + 2
    assert summary["itl"]["count"] > 0
    assert abs(summary["output_tokens"] - 8 * summary["latency"]["count"]) <= 2  # from a rounded CSV mean
    assert (tmp_path / "lt" / "report.html").is_file() and (tmp_path / "lt" / "locust_stats.csv").is_file()


def test_chat_burst_reports_each_burst_of_sampled_streams(tiny_server):
    """loadtests.chat_burst, whose tokens/s and inter-token latencies docs/BENCHMARKS.md quotes: every stream writes
    its --tokens tokens (ignore_eos), one JSON line per burst."""
    args = ("--url", tiny_server.v1, "--streams", "3", "--tokens", "16", "--bursts", "2", "--temperature", "1.0")
    result = run_cli("loadtests.chat_burst", *args, "--top-p", "0.95", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    bursts = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [b["burst"] for b in bursts] == [1, 2] and all(b["streams"] == 3 for b in bursts)
    assert all(b["tokens_per_s"] > 0 and 0 < b["itl_p50_ms"] <= b["itl_p99_ms"] for b in bursts)
    staggered = run_cli("loadtests.chat_burst", *args, "--parts", "2", "--stagger", "0.2", timeout=300)
    assert staggered.returncode == 0, staggered.stderr[-2000:]
    parts = [json.loads(line) for line in staggered.stdout.strip().splitlines()]
    # a token ending inside a character is held back: fewer content chunks than tokens
    assert all(b["parts"] == 2 and 0 < b["gaps"] <= 3 * 15 for b in parts)
    assert all(0 <= b["gaps_over_3x_median"] <= b["gaps"] for b in parts)
    assert all(0 < b["ttft_p50_ms"] <= b["ttft_p99_ms"] for b in parts)
