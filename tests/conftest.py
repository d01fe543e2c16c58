from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import REPO, run_cli


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """With REQUIRE_ALL_TESTS set (.ci/run sets it), a skipped test fails: CI installs every tool the suite uses
    (nginx, locust, hadolint), so a skip there means a test that should run could not. Tests marked `gpu` may
    still skip on a machine without one, and those marked `cpu_path` on a CPU without the instructions their code
    path needs (CI's machines have been AVX-512 and AVX2-only ones; no emulator runs the other's code)."""
    outcome = yield
    report = outcome.get_result()
    exempt = item.get_closest_marker("gpu") or item.get_closest_marker("cpu_path")
    if report.skipped and os.environ.get("REQUIRE_ALL_TESTS") and exempt is None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped ({reason}), but REQUIRE_ALL_TESTS is set: this test must run here"


@pytest.fixture(scope="session")
def default_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default SmolLM2 bundle: the one `make test` exported, or exported here once."""
    path = Path(os.environ.get("DEFAULT_BUNDLE", REPO / "bundles" / "smollm2-135m"))
    if not path.is_absolute():
        path = REPO / path
    if not (path / "manifest.json").is_file():
        path = tmp_path_factory.mktemp("bundles") / "smollm2-135m"
        result = run_cli("export", "--source", "default", "--out", str(path))
        assert result.returncode == 0, result.stderr
    return path


@pytest.fixture(scope="session")
def tiny_source(default_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama checkpoint with SmolLM2's real tokenizer and chat template: fast, and its random tokens
    exercise byte-level pieces (split UTF-8 characters, emoji, CJK) that a trained model rarely emits."""
    import json

    from tests.helpers import write_hf_checkpoint

    src = tmp_path_factory.mktemp("tiny-src") / "tiny-llama"
    manifest = json.loads((default_bundle / "manifest.json").read_text())
    write_hf_checkpoint(src, "llama", tokenizer_json=(default_bundle / "tokenizer.json").read_text(), seed=1)
    (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": manifest["tokenizer"]["chat_template"]}))
    return src


def export_tiny(source: Path, tmp_path_factory: pytest.TempPathFactory, *flags: str) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "tiny"
    result = run_cli(
        "export", "--source", str(source), "--out", str(out), "--name", "tiny", "--max-context", "256", *flags
    )
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tiny_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint's bundle as `make export` would write it (the project's ops where they are built)."""
    return export_tiny(tiny_source, tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_bundle_onnxruntime(tiny_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same with onnxruntime's own ops only (`--kernels none`): GroupQueryAttention binds one contiguous range of
    cache rows a call, so cached prefixes are copied between slots and rows are moved, as on CUDA."""
    return export_tiny(tiny_source, tmp_path_factory, "--kernels", "none")
