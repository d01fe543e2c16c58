"""Bundles the service must refuse, in one line naming the file: an older format, fp32 attention on CUDA."""

from __future__ import annotations

import json
import shutil

import onnxruntime as ort
import pytest

from service.bundle import BundleError, load_bundle
from service.engine import _cuda_only_session


def test_a_format_1_bundle_is_refused_with_a_re_export_hint(tiny_bundle, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(tiny_bundle, old)
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(BundleError, match=r"manifest.json: format_version is 1, expected 2 \(re-export"):
        load_bundle(old)


def test_fp32_attention_is_refused_on_cuda_before_any_session(tiny_bundle):
    """onnxruntime's CUDA GroupQueryAttention is fp16 (and bf16) only: an fp32 bundle would run attention on the CPU and
    move the cache every step, so the engine refuses it (the check needs no GPU)."""
    bundle = load_bundle(tiny_bundle)
    assert bundle.cache_dtype == "float32"
    with pytest.raises(
        BundleError, match="attention is float32, which onnxruntime.s CUDA GroupQueryAttention.*--dtype fp16"
    ):
        _cuda_only_session(bundle, ort.SessionOptions())
