"""Bundles exported where the project's ops are built run them (ortkernels/: CausalAttention and SwiGLU in fp32 graphs,
MatMulQ4_1 over a GGUF's Q4_1 blocks): where the library is not built the service refuses such a bundle in one line,
naming the ops and how to build them; `--kernels none` exports onnxruntime's own ops only."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import onnx
import pytest

import ortkernels
from service.bundle import BundleError, load_bundle
from service.engine import Engine
from tests.helpers import needs_kernels

pytestmark = [pytest.mark.e2e, needs_kernels]


def test_a_bundle_that_needs_the_kernels_is_refused_by_name_where_they_are_not_built(q4_bundles, monkeypatch):
    int4, fp32 = load_bundle(q4_bundles("int4-gguf")), load_bundle(q4_bundles("fp32"))
    assert int4.kernels == ("CausalAttention", "MatMulQ4_1") and fp32.kernels == ("CausalAttention", "SwiGLU")
    for bundle in (int4, fp32):
        Engine(bundle, slots=1, max_len=64).session  # noqa: B018  where built, they load
    monkeypatch.setattr(ortkernels, "LIBRARY", ortkernels.LIBRARY.with_name("missing.so"))
    for bundle in (int4, fp32):
        ops = ", ".join(bundle.kernels)
        with pytest.raises(
            BundleError, match=f"runs {ops} from this project.s ortkernels/ library, which is not built"
        ):
            Engine(bundle, slots=1, max_len=64)
    plain = load_bundle(q4_bundles("fp32-onnxruntime"))
    assert plain.kernels == ()
    Engine(plain, slots=1, max_len=64)  # onnxruntime's own ops: no library needed


def census(bundle: Path) -> tuple[collections.Counter, int]:
    n_layer = json.loads((bundle / "manifest.json").read_text())["model"]["n_layer"]
    return collections.Counter(
        n.op_type for n in onnx.load(bundle / "model.onnx", load_external_data=False).graph.node
    ), n_layer


def test_an_int4_llama_layer_is_seven_nodes(q4_bundles):
    """q/k/v, o, gate/up with SwiGLU inside, down: four MatMulQ4_1; two norms; attention (docs/EXPORT.md census)."""
    ops, n_layer = census(q4_bundles("int4-gguf"))
    assert ops["MatMulQ4_1"] == 4 * n_layer  # the unembedding as the file keeps it (here an fp32 Gemm)
    assert ops["CausalAttention"] == n_layer and ops["SkipSimplifiedLayerNormalization"] == 2 * n_layer
    assert not ops["Split"] and not ops["QuickGelu"] and not ops["Mul"] and not ops["MatMulNBits"]
    assert not ops["GroupQueryAttention"]


def test_an_fp32_llama_layer_is_eight_nodes_and_ten_without_the_kernels(q4_bundles):
    """Four MatMul, two norms, CausalAttention, SwiGLU; with onnxruntime's ops alone GroupQueryAttention, and Split,
    QuickGelu and Mul for SwiGLU (docs/EXPORT.md census)."""
    ops, n_layer = census(q4_bundles("fp32"))
    assert ops["MatMul"] == 4 * n_layer and ops["SkipSimplifiedLayerNormalization"] == 2 * n_layer
    assert ops["CausalAttention"] == ops["SwiGLU"] == n_layer
    assert not ops["GroupQueryAttention"] and not ops["Split"] and not ops["QuickGelu"] and not ops["Mul"]
    plain, _ = census(q4_bundles("fp32-onnxruntime"))
    assert plain["GroupQueryAttention"] == plain["Split"] == plain["QuickGelu"] == plain["Mul"] == n_layer
    assert not plain["CausalAttention"] and not plain["SwiGLU"]
