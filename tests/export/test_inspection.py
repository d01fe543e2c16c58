"""The bundle's inspection graph: verified at export, recorded in the manifest, and without weights of its own."""

from __future__ import annotations

import json

import onnx
import pytest
from onnx import numpy_helper

from export.errors import ExportError
from export.inspection import share_weights


def external(t: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def test_manifest_records_a_verified_inspection_graph(tiny_bundle):
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    entry = m["inspect"]
    assert entry["file"] == "inspect.onnx" and "inspect.onnx" in m["files"] and entry["max_tokens"] == 256
    assert entry["outputs"]["attention"]["shape"] == [2, 4, "sequence", "sequence"]
    r = entry["parity"]
    assert r["max_abs_prob_diff"] <= 1e-4 and r["max_row_sum_error"] <= 1e-4 and r["max_above_diagonal"] == 0.0
    assert r["max_abs_logit_diff"] <= 1e-3 and max(r["prompt_lengths"]) == 256


def test_every_weight_is_the_serving_graph_s_tensor_in_its_data_file(tiny_bundle):
    serving = {
        t.name: t for t in onnx.load(str(tiny_bundle / "model.onnx"), load_external_data=False).graph.initializer
    }
    inspect = onnx.load(str(tiny_bundle / "inspect.onnx"), load_external_data=False).graph.initializer
    shared = [t for t in inspect if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(shared) == sum(1 for t in serving.values() if t.data_location == onnx.TensorProto.EXTERNAL)
    for t in shared:
        assert external(t) == external(serving[t.name]) and external(t)["location"] == "model.onnx.data"
        assert list(t.dims) == list(serving[t.name].dims)
    assert all(len(t.raw_data) < 1024 for t in inspect if t.data_location != onnx.TensorProto.EXTERNAL)
    assert not list(tiny_bundle.glob("*.data"))[1:]  # one weights file in the bundle


def test_a_weight_without_a_twin_is_refused(tiny_bundle, tmp_path):
    as_exported = onnx.load(str(tiny_bundle / "inspect.onnx"))  # weights read in from model.onnx.data
    served = onnx.load(str(tiny_bundle / "model.onnx"), load_external_data=False).graph.initializer
    n_external = sum(1 for t in served if t.data_location == onnx.TensorProto.EXTERNAL)
    assert share_weights(as_exported, tiny_bundle / "model.onnx")[1] == n_external  # every weight found
    graph = onnx.load(str(tiny_bundle / "inspect.onnx"))
    big = max(graph.graph.initializer, key=lambda t: len(t.raw_data))
    a = numpy_helper.to_array(big).copy()
    a.flat[0] += 1.0
    big.CopyFrom(numpy_helper.from_array(a, big.name))
    with pytest.raises(ExportError, match="no identical tensor"):
        share_weights(graph, tiny_bundle / "model.onnx")
