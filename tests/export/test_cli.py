"""`python -m export` as a user runs it: tiny checkpoints end to end, and bad input."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from export.bundle import sha256
from export.parity import BOUNDS, ParityReport
from tests.helpers import run_cli, write_gguf_from_hf, write_hf_checkpoint


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf-llama")
    hf = write_hf_checkpoint(directory, "llama")
    return directory, hf


def copy_of(tiny_llama, src: Path) -> Path:
    """A copy of the tiny checkpoint to change."""
    shutil.copytree(tiny_llama[0], src)
    return src


@pytest.mark.parametrize(
    "extra, variants",
    [([], ["fp32"]), (["--dtype", "fp16"], ["fp16"]), (["--quantize", "int8"], ["fp32", "int8"])],
)
def test_hf_dir_exports_a_verified_bundle(tiny_llama, tmp_path, extra, variants):
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
    reports = [ParityReport.from_dict(r) for r in manifest["parity"]]
    assert [r.variant for r in reports] == variants  # the graph as exported, then its quantized form
    for r in reports:  # each one run here in onnxruntime and within its own bound, as the report line says
        assert r.verified and r.passed() and r.bound == BOUNDS[r.variant], r.line()
        assert r.line().strip() in result.stdout and r.line().endswith("ok")
    if variants == ["fp32"]:
        assert reports[0].max_abs_diff <= 1e-3 and reports[0].top1_agreement == 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no temp dirs left behind


def test_int8_of_a_tied_embedding_keeps_the_table_its_gather_reads(tmp_path):
    """GPT-2's unembedding is its embedding: onnxruntime's quantizer would transpose that table for a MatMul in
    place, under the embedding's Gather too (the default model's int8 export failed so). The Gemm stays fp32 and
    shares the one table."""
    import onnx

    directory = tmp_path / "hf-gpt2"
    write_hf_checkpoint(directory, "gpt2")
    out = tmp_path / "bundle"
    result = run_cli(
        "export", "--source", str(directory), "--out", str(out), "--max-context", "128", "--quantize", "int8"
    )
    assert result.returncode == 0, result.stderr
    reports = [ParityReport.from_dict(r) for r in json.loads((out / "manifest.json").read_text())["parity"]]
    assert [r.variant for r in reports] == ["fp32", "int8"] and all(r.verified and r.passed() for r in reports)
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    (gemm,) = [n for n in graph.node if n.op_type == "Gemm"]
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] == gemm.input[1]]
    assert len(gathers) == 1, "the embedding reads the unembedding's one table"
    assert all(a.f == 1.0 for a in gemm.attribute if a.name == "alpha")
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for n in graph.node)


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
    reports = [ParityReport.from_dict(r) for r in json.loads((out / "manifest.json").read_text())["parity"]]
    assert [r.variant for r in reports] == ["fp32", "int4-gguf"]
    assert all(r.verified and r.passed() for r in reports)
    assert reports[-1].max_abs_diff < 1e-2 and reports[-1].top1_agreement == 1.0


def outliers_int4_cannot_hold(directory) -> None:
    """A tiny Llama that int4 re-quantization must ruin: one input channel of every block of 32 is always zero (its
    norm weight, or the rows that produce it, are zero) and carries a weight of 1000 in every linear. The fp32 graph
    is unchanged by it (1000 x 0), but each block's 4-bit scale spans 1000, so every other weight rounds to zero."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(directory)
    hidden = [0, 32]  # zero inputs of q/k/v, gate/up and the unembedding: the norms' channels 0 and 32
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[hidden] = 0.0
            layer.post_attention_layernorm.weight[hidden] = 0.0
            layer.self_attn.v_proj.weight[[0, 16]] = 0.0  # o_proj's inputs 0 and 32 (heads 0 and 2 read kv 0, 1)
            layer.mlp.gate_proj.weight[[0, 32, 64, 96]] = 0.0  # silu(0) = 0: down_proj's inputs 0, 32, 64, 96
            for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                linear.weight[:, hidden] = 1000.0
            layer.self_attn.o_proj.weight[:, [0, 32]] = 1000.0
            layer.mlp.gate_proj.weight[:, hidden] = 1000.0
            layer.mlp.up_proj.weight[:, hidden] = 1000.0
            layer.mlp.down_proj.weight[:, [0, 32, 64, 96]] = 1000.0
        model.model.norm.weight[hidden] = 0.0
        model.lm_head.weight[:, hidden] = 1000.0
    model.save_pretrained(directory, safe_serialization=True)


def test_a_bound_that_is_missed_fails_the_export(tiny_llama, tmp_path):
    """int4 re-quantization of weights it cannot represent: top-1 agreement far below the bound, no bundle."""
    src = copy_of(tiny_llama, tmp_path / "src")
    outliers_int4_cannot_hold(src)
    out = tmp_path / "bundle"
    result = run_cli("export", "--source", str(src), "--out", str(out), "--quantize", "int4")
    assert "fp32 " in result.stdout and "ok" in result.stdout.split("int4 ")[0]  # fp32 still exact
    assert "int4 " in result.stdout and "FAILED" in result.stdout
    assert result.returncode == 2 and result.stderr.strip().startswith("error: parity check failed")
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["src"]


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
    src = copy_of(tiny_llama, tmp_path / "cut")
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


@pytest.mark.parametrize("kind", ["checkpoint", "folder"])
def test_out_that_is_not_a_bundle_is_refused_before_any_work(tiny_llama, tmp_path, kind):
    """`--out` naming the checkpoint itself or a folder of other files: refused in one line, nothing moved."""
    src = copy_of(tiny_llama, tmp_path / "src")
    other = tmp_path / "bundles"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    out = src if kind == "checkpoint" else other
    result = run_cli("export", "--source", str(src), "--out", str(out))
    assert result.returncode == 2 and "is not a bundle" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "] load" not in result.stdout
    assert (src / "config.json").is_file() and (other / "keep.txt").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundles", "src"]


def test_out_dot_is_the_working_directory_and_refused_unless_a_bundle(tmp_path, monkeypatch):
    from export.bundle import FORMAT, check_target
    from export.errors import ExportError

    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("x")
    monkeypatch.chdir(work)
    with pytest.raises(ExportError, match="is not a bundle"):
        check_target(Path("."))
    assert check_target(Path("new")) == work / "new"  # absent: fine
    (work / "old").mkdir()
    (work / "old" / "manifest.json").write_text(json.dumps({"format": FORMAT}))
    assert check_target(Path("old")) == work / "old"  # an earlier bundle: replaced at the end


def test_quantized_checkpoints_are_refused(tiny_llama, tmp_path):
    src = copy_of(tiny_llama, tmp_path / "fp8")
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors"}
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "b"
    _assert_clean_failure(
        run_cli("export", "--source", str(src), "--out", str(out)), out, "quantized checkpoint", "compressed-tensors"
    )


def test_a_sharded_checkpoint_loads_the_files_its_index_names(tiny_llama, tmp_path):
    """A stale shard beside the index's files is not read (it would overwrite tensors); a missing one is named."""
    from export.checkpoints import load

    src = copy_of(tiny_llama, tmp_path / "sharded")
    (src / "model.safetensors").rename(src / "model-00001-of-00001.safetensors")
    index = {"metadata": {}, "weight_map": {"any": "model-00001-of-00001.safetensors"}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    (src / "model-stale.safetensors").write_bytes(b"not read")
    ckpt = load(str(src))
    assert ckpt.weights
    (src / "model-00001-of-00001.safetensors").unlink()
    out = tmp_path / "b"
    _assert_clean_failure(run_cli("export", "--source", str(src), "--out", str(out)), out, "missing weight file")


def test_one_part_of_a_split_gguf_is_refused_naming_the_merge(tiny_llama, tmp_path):
    directory, hf = tiny_llama
    path = tmp_path / "model-00001-of-00002.gguf"
    write_gguf_from_hf(path, hf, (directory / "tokenizer.json").read_text(), split_count=2)
    out = tmp_path / "b"
    _assert_clean_failure(run_cli("export", "--source", str(path), "--out", str(out)), out, "split GGUF", "--merge")
