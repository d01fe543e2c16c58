"""An int4 bundle over a GGUF's Q4_1 blocks runs the project's MatMulQ4_1 (ortkernels/): where the library is not built
the service refuses it in one line, naming the op and how to build it."""

from __future__ import annotations

import collections
import json

import onnx
import pytest

import ortkernels
from service.bundle import BundleError, load_bundle
from service.engine import Engine

pytestmark = pytest.mark.e2e


def test_a_bundle_that_needs_the_kernels_is_refused_by_name_where_they_are_not_built(q4_bundles, monkeypatch):
    bundle = load_bundle(q4_bundles("int4-gguf"))
    assert bundle.kernels == ("MatMulQ4_1",)
    Engine(bundle, slots=1, max_len=64).session  # noqa: B018  where built, it loads
    monkeypatch.setattr(ortkernels, "LIBRARY", ortkernels.LIBRARY.with_name("missing.so"))
    with pytest.raises(BundleError, match=r"runs MatMulQ4_1 from this project.s ortkernels/ library, which is not"):
        Engine(bundle, slots=1, max_len=64)
    plain = load_bundle(q4_bundles("int4-gguf-matmulnbits"))
    assert plain.kernels == ()
    Engine(plain, slots=1, max_len=64)  # onnxruntime's own ops: no library needed


def test_an_int4_llama_layer_is_seven_nodes(q4_bundles):
    """q/k/v, o, gate/up with SwiGLU inside, down: four MatMulQ4_1; two norms; attention (docs/EXPORT.md census)."""
    bundle = q4_bundles("int4-gguf")
    n_layer = json.loads((bundle / "manifest.json").read_text())["model"]["n_layer"]
    ops = collections.Counter(n.op_type for n in onnx.load(bundle / "model.onnx", load_external_data=False).graph.node)
    assert ops["MatMulQ4_1"] == 4 * n_layer  # the unembedding as the file keeps it (here an fp32 Gemm)
    assert ops["GroupQueryAttention"] == n_layer and ops["SkipSimplifiedLayerNormalization"] == 2 * n_layer
    assert not ops["Split"] and not ops["QuickGelu"] and not ops["Mul"] and not ops["MatMulNBits"]
