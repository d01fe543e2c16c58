"""The commands docs/EXPORT.md and docs/BENCHMARKS.md quote for engine-only figures still run and print what the
docs read from them (few steps on a tiny bundle: the figures themselves are not measured here)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import needs_kernels, run_cli

pytestmark = pytest.mark.e2e


def test_engine_alone_reports_prefill_step_time_and_tokens_per_second(q4_bundles):
    args = ("--prompt-tokens", "16", "--steps", "4", "--rows", "3")
    result = run_cli("loadtests.engine", "--bundle", str(q4_bundles("int4-gguf")), *args, timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["rows"] == 3 and out["prefill_ms"] > 0 and out["ms_per_step"] > 0
    assert out["tokens_per_s"] == pytest.approx(3 / out["ms_per_step"] * 1e3)


@needs_kernels
def test_profiler_table_covers_the_ops_of_a_decode_step(q4_bundles):
    args = ("--steps", "3", "--prompt-tokens", "8", "--rows", "2", "--top", "100")
    result = run_cli("loadtests.profile", "--bundle", str(q4_bundles("int4-gguf")), *args, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert "ms per session run" in lines[0] and "in kernels" in lines[0]
    assert lines[1] == "| op | ms/step | share | nodes |"
    ops = {line.split(" | ")[0].removeprefix("| ") for line in lines[3:]}
    assert {"MatMulQ4_1", "CausalAttention", "Gather"} <= ops  # the 4-bit weights, attention, embedding


@needs_kernels
def test_profiler_prefill_mode_times_whole_prompts(q4_bundles):
    args = ("--prefill", "--steps", "2", "--prompt-tokens", "24", "--top", "100")
    result = run_cli("loadtests.profile", "--bundle", str(q4_bundles("fp32")), *args, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("2 prefills of 24 tokens") and "ms per session run" in lines[0]
    assert lines[1] == "| op | ms/prefill | share | nodes |"
    rows = {line.split(" | ")[0].removeprefix("| "): line.split(" | ") for line in lines[3:]}
    assert {"MatMul", "CausalAttention", "SwiGLU", "Gather"} <= set(rows)  # projections, attention, MLP, embedding
    assert sum(float(r[1]) for r in rows.values()) > 0
    nodes = {op: int(r[3].rstrip(" |")) for op, r in rows.items()}
    assert nodes["MatMul"] == 4 * nodes["CausalAttention"]  # per layer: q/k/v, o, gate/up, down; one attention


def test_minimum_term_cost_compares_the_exact_graph_with_one_without_them(q4_bundles):
    bundle = q4_bundles("int4-gguf-matmulnbits")
    args = ("--rounds", "1", "--prompt-tokens", "8", "--steps", "4")
    result = run_cli("loadtests.minterm", "--bundle", str(bundle), *args, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    runs = [json.loads(line) for line in lines[:-1]]
    assert [r["graph"] for r in runs] == ["exact", "without minimum terms"]
    assert all(r["tokens_per_s"] > 0 for r in runs)
    n_layer = json.loads((bundle / "manifest.json").read_text())["model"]["n_layer"]
    assert lines[-1].startswith(f"{4 * n_layer} minimum terms;")  # q/k/v, o, gate/up and down of every layer
    assert sorted(p.name for p in bundle.parent.iterdir()) == [bundle.name]  # its temporary copy is gone


@needs_kernels
def test_attention_alone_times_the_bundles_attention_node_with_and_without_flash(q4_bundles):
    bundle = q4_bundles("fp32")
    args = ("--compare-flash", "--rounds", "1", "--calls", "5", "--cache-len", "300")
    result = run_cli("loadtests.attention", "--bundle", str(bundle), *args, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    cases = [(1, 1, 256), (16, 1, 128), (16, 1, 256), (1, 128, 0)]  # those that fit 300 positions
    assert [(r["rows"], r["new_tokens"], r["cached"]) for r in rows] == cases * 2
    assert [r["flash"] for r in rows] == [True] * 4 + [False] * 4
    n_layer = json.loads((bundle / "manifest.json").read_text())["model"]["n_layer"]
    assert all(
        r["ms_per_call"] > 0 and r["ms_all_layers"] == pytest.approx(r["ms_per_call"] * n_layer, abs=0.1) for r in rows
    )
    # onnxruntime's int8 cache form of the same node runs too
    args = ("--cache", "int8-per-channel", "--calls", "4", "--cache-len", "300")
    result = run_cli("loadtests.attention", "--bundle", str(bundle), *args, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [r["cache"] for r in rows] == ["int8-per-channel"] * 4 and all(r["ms_per_call"] > 0 for r in rows)
    # onnxruntime's node and the project's CausalAttention, case by case in one process
    args = ("--op", "both", "--calls", "4", "--cache-len", "300")
    result = run_cli("loadtests.attention", "--bundle", str(bundle), *args, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [(r["op"], r["rows"], r["new_tokens"], r["cached"]) for r in rows] == [
        (op, *case) for case in cases for op in ("gqa", "causal")
    ]
    assert all(r["ms_per_call"] > 0 for r in rows)


def test_divergence_of_an_int4_bundle_from_its_fp32_one(q4_bundles, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    fp32, int4 = q4_bundles("fp32"), q4_bundles("int4-gguf")
    args = ("--reference", str(fp32), str(fp32), str(int4), "--text", str(text), "--tokens", "40")
    result = run_cli("export.divergence", *args, timeout=300)
    assert result.returncode == 0, result.stderr
    same, int4_row = (json.loads(line) for line in result.stdout.strip().splitlines())
    assert same["kl"] == 0 and same["top1"] == 1 and same["ppl_ratio"] == 1  # against itself
    assert int4_row["bundle"] == str(int4) and int4_row["tokens"] == 40 and 0 < int4_row["kl"] < 1


@needs_kernels
def test_paired_decode_reports_each_bundle_against_the_first(q4_bundles):
    fp32, int4 = q4_bundles("fp32"), q4_bundles("int4-gguf")
    args = ("--rounds", "3", "--chunk", "2", "--prompt-tokens", "8")
    specs = [str(int4), str(fp32), f"{int4}@session.dynamic_block_base=0"]  # the last: a session config entry
    result = run_cli("loadtests.paired", *specs, *args, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [r["bundle"] for r in rows] == specs
    assert rows[0]["step_ratio_to_first"] == 1 and all(r["step_ratio_to_first"] > 0 for r in rows)
    assert all(r["ms_per_step"] > 0 and r["tokens_per_s"] > 0 and r["rounds"] == 3 for r in rows)
    # prompt calls: a first prompt, and a continuation after cached positions
    for extra in (("--prefill", "12"), ("--prefill", "5", "--cached", "20")):
        result = run_cli("loadtests.paired", str(fp32), str(q4_bundles("fp32-onnxruntime")), *args, *extra, timeout=300)
        assert result.returncode == 0, result.stderr
        rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
        assert rows[0]["call_ratio_to_first"] == 1 and rows[1]["call_ratio_to_first"] > 0
        assert all(r["ms_per_call"] > 0 and r["new_tokens"] == int(extra[1]) for r in rows)
        assert all(r["cached"] == (int(extra[3]) if len(extra) > 2 else 0) for r in rows)
    # several chats' turns in one call: each row count of each bundle on the project's attention
    result = run_cli("loadtests.paired", str(fp32), *args, "--prefill", "5", "--cached", "20", "--rows", "1,3")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [r["bundle"] for r in rows] == [f"{fp32} x1 rows", f"{fp32} x3 rows"] and rows[1]["call_ratio_to_first"] > 0


def test_paired_refuses_several_rows_after_cached_positions_on_onnxruntimes_attention_in_one_line(q4_bundles):
    """GroupQueryAttention takes one row a call once positions are cached: said in one line, not its traceback."""
    bundle = q4_bundles("fp32-onnxruntime")
    args = ("--rounds", "1", "--prefill", "5", "--cached", "20", "--rows", "1,3")
    result = run_cli("loadtests.paired", str(bundle), *args, timeout=300)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"paired: {bundle}: several rows' prompts after cached positions need CausalAttention"
    ]


def test_divergence_refuses_a_missing_bundle_in_one_line(tmp_path):
    result = run_cli("export.divergence", "--reference", str(tmp_path / "nowhere"), str(tmp_path), timeout=60)
    assert result.returncode == 2 and "nowhere: not a bundle (no manifest.json)" in result.stderr
    assert "Traceback" not in result.stderr


def test_scheduler_profile_reports_graph_host_and_reduction_per_case(q4_bundles):
    """docs/BENCHMARKS.md reads step, graph, host and reduce times and the host share from these lines; with
    --reduce-logits (forced on the CPU here) the steps with 4+ sampled rows reduce their logits."""
    result = run_cli("loadtests.scheduler_profile", "--bundle", str(q4_bundles("fp32")), "--reduce-logits", timeout=600)
    assert result.returncode == 0, result.stderr
    cases = {c["case"]: c for c in map(json.loads, result.stdout.strip().splitlines())}
    assert len(cases) == 10
    for c in cases.values():
        assert c["step_ms"] == pytest.approx(c["graph_ms"] + c["host_ms"], abs=0.02)
        assert 0 <= c["reduce_ms"] <= c["host_ms"] and 0 < c["host_share"] < 1
    assert cases["batch 16 sampled"]["reduce_ms"] > 0 and cases["batch 4, the model's defaults"]["reduce_ms"] > 0
    assert cases["batch 16 greedy"]["reduce_ms"] == 0 and cases["batch 1 sampled"]["reduce_ms"] == 0
    assert cases["batch 16, temperature 1.0, top-p 0.95"]["reduce_ms"] > 0  # wide rows: reduced, then fetched


def test_scheduler_profile_says_a_missing_bundle_or_device_in_one_line(tmp_path, q4_bundles):
    """No bundle there; --device cuda on an fp32 bundle (no usable GPU here, or a GPU whose attention kernels do not
    take fp32): one line each, no traceback."""
    for args in (("--bundle", str(tmp_path / "nowhere")), ("--bundle", str(q4_bundles("fp32")), "--device", "cuda")):
        result = run_cli("loadtests.scheduler_profile", *args, timeout=120)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("scheduler_profile: ")


def test_reduced_logits_check_finds_equal_values_tokens_and_texts(q4_bundles):
    """loadtests.reduced_logits, whose equalities and step times docs/BENCHMARKS.md quotes for the GPU, run on the
    CPU (the reduction forced on): the reduced values equal the full logits' and sampling either way agrees."""
    args = ("--device", "cpu", "--seeds", "2", "--reps", "1", "--tokens", "4")
    result = run_cli("loadtests.reduced_logits", "--bundle", str(q4_bundles("fp32")), *args, timeout=600)
    assert result.returncode == 0, result.stderr
    parts = [json.loads(line) for line in result.stdout.strip().splitlines()]
    values, tokens, scheduler, *steps = parts
    assert values["top_equal"] and values["ids_consistent"] and values["edit_values_equal"]
    assert values["lse_max_abs_err"] < 1e-3 and values["mass_max_rel_err"] < 1e-3
    assert tokens == {"part": "tokens", "rows": 32, "different": 0}
    assert scheduler["equal_texts"] == scheduler["sequences"] == 16
    assert len(steps) == 6 and all(len(s["full_ms"]) == len(s["reduced_ms"]) == 2 for s in steps)


def test_long_prompt_ttft_compares_two_prefill_chunks(tiny_bundle):
    args = ("--bundle", str(tiny_bundle), "--tokens", "40", "--rounds", "2", "--chunks", "64,16")
    result = run_cli("loadtests.long_prompt", *args, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [(r["prefill_chunk"], r["tokens"], len(r["ttft_ms"])) for r in rows] == [(64, 40, 2), (16, 40, 2)]
    assert rows[0]["ratio_to_first"] == 1.0 and rows[1]["ratio_to_first"] > 0
    assert all(t > 0 for r in rows for t in r["ttft_ms"])


def test_event_loop_cpu_per_token_reads_the_servers_threads(tiny_bundle):
    args = ("--bundle", str(tiny_bundle), "--tokens", "8", "--requests", "2", "--rounds", "1")
    result = run_cli("loadtests.event_loop_cpu", *args, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [(r["round"], r["stream"], r["tokens"]) for r in rows] == [(1, True, 16), (1, False, 16)]
    for r in rows:
        assert r["wall_ms_per_token"] > 0 and r["event_loop_us_per_token"] >= 0
        assert r["busiest_other_threads_us_per_token"]  # the engine thread and onnxruntime's are there


def test_prefill_calls_times_a_burst_per_rows_per_call(q4_bundles):
    args = ("--prompts", "4", "--prompt-tokens", "8", "--rows", "1,4", "--rounds", "2")
    result = run_cli("loadtests.prefill_calls", "--bundle", str(q4_bundles("fp32")), *args, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [(r["round"], r["rows_per_call"]) for r in lines[:-1]] == [(1, 1), (1, 4), (2, 4), (2, 1)]
    for r in lines[:-1]:  # one call of 4: every prompt's logits come at its end
        assert 0 < r["median_first_ms"] <= r["burst_ms"]
        assert r["rows_per_call"] == 1 or r["median_first_ms"] == r["burst_ms"]
    assert set(lines[-1]) == {"bundle", "prompts", "1 rows", "4 rows"}


@needs_kernels
def test_shared_prefix_compares_reading_a_prefix_where_it_is_with_copying_it(tiny_bundle):
    args = ("--rounds", "1", "--users", "3", "--turns", "2", "--system-tokens", "40", "--turn-tokens", "6")
    result = run_cli(
        "loadtests.shared_prefix", "--bundle", str(tiny_bundle), *args, "--output-tokens", "4", timeout=300
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [r["mode"] for r in rows] == ["share", "copy"]
    assert all(r["ttft_p50_ms"] > 0 and r["decode_step_ms"] > 0 and r["wall_s"] > 0 for r in rows)
