"""`python -m export` as a user runs it: tiny checkpoints end to end, and bad input."""

from __future__ import annotations

import json
import struct

import pytest

from export.bundle import sha256
from tests.helpers import run_cli, write_gguf_from_hf, write_hf_checkpoint


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf-llama")
    hf = write_hf_checkpoint(directory, "llama")
    return directory, hf


@pytest.mark.parametrize("extra", [[], ["--dtype", "fp16"], ["--quantize", "int8"]])
def test_hf_dir_exports_a_verified_bundle(tiny_llama, tmp_path, extra):
    directory, _ = tiny_llama
    out = tmp_path / "bundle"
    result = run_cli("export", "--source", str(directory), "--out", str(out), "--max-context", "128", *extra)
    assert result.returncode == 0, result.stderr
    for phase in ("load", "convert", "export", "verify", "write"):
        assert f"] {phase}" in result.stdout
    assert "parity report" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["max_context"] == 128
    assert manifest["graph"]["cache"]["attention_op"] == "com.microsoft::GroupQueryAttention"
    for name, meta in manifest["files"].items():
        assert sha256(out / name) == meta["sha256"]
    first = manifest["parity"][0]
    if not extra:
        assert first["variant"] == "fp32" and first["max_abs_diff"] <= 1e-3 and first["top1_agreement"] == 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no temp dirs left behind


def test_gguf_with_q4_blocks_exports_int4_from_its_own_blocks(tiny_llama, tmp_path):
    directory, hf = tiny_llama
    path = tmp_path / "tiny-q4.gguf"
    write_gguf_from_hf(path, hf, (directory / "tokenizer.json").read_text(), quantize_linears=True)
    out = tmp_path / "bundle"
    result = run_cli(
        "export", "--source", str(path), "--out", str(out), "--quantize", "int4", "--int4-accuracy-level", "0"
    )  # fp32 compute: the carried blocks must reproduce fp32 exactly
    assert result.returncode == 0, result.stderr
    assert "carried 14 GGUF-quantized tensors" in result.stdout
    report = json.loads((out / "manifest.json").read_text())["parity"][-1]
    assert report["variant"] == "int4-gguf" and report["max_abs_diff"] < 1e-2 and report["top1_agreement"] == 1.0


def test_a_bound_that_is_missed_fails_the_export(tiny_llama, tmp_path):
    """Re-quantizing a tiny random model to int4 flips too many of its near-tied argmaxes: no bundle."""
    directory, _ = tiny_llama
    out = tmp_path / "bundle"
    result = run_cli("export", "--source", str(directory), "--out", str(out), "--quantize", "int4")
    assert "int4 " in result.stdout and "FAILED" in result.stdout
    assert result.returncode == 2 and result.stderr.strip().startswith("error: parity check failed")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def _assert_clean_failure(result, out, *words):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for w in words:
        assert w in lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_missing_path(tmp_path):
    out = tmp_path / "b"
    _assert_clean_failure(run_cli("export", "--source", str(tmp_path / "nope"), "--out", str(out)), out, "no such file")


def test_unsupported_architecture(tmp_path):
    src = tmp_path / "bert"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "bert"}))
    out = tmp_path / "b"
    _assert_clean_failure(
        run_cli("export", "--source", str(src), "--out", str(out)), out, "unsupported architecture", "bert"
    )


def test_truncated_gguf(tiny_llama, tmp_path):
    directory, hf = tiny_llama
    path = tmp_path / "cut.gguf"
    write_gguf_from_hf(path, hf, (directory / "tokenizer.json").read_text())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    out = tmp_path / "b"
    _assert_clean_failure(run_cli("export", "--source", str(path), "--out", str(out)), out, "cut.gguf")


def test_truncated_safetensors(tiny_llama, tmp_path):
    import shutil

    directory, _ = tiny_llama
    src = tmp_path / "cut"
    shutil.copytree(directory, src)
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    out = tmp_path / "b"
    _assert_clean_failure(run_cli("export", "--source", str(src), "--out", str(out)), out, "model.safetensors")


def test_not_a_gguf(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\x00" * 7)
    out = tmp_path / "b"
    _assert_clean_failure(run_cli("export", "--source", str(path), "--out", str(out)), out, "junk.gguf")
