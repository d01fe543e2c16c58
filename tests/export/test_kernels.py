"""export/kernels.py: which GroupQueryAttention nodes become CausalAttention (only those it computes the same) and
how a gated MLP's Split, QuickGelu and Mul become one SwiGLU."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export import kernels
from ortkernels import DOMAIN


def gqa_model(head_dim: int = 16, table_width: int | None = None, outputs: int = 3, **attrs) -> onnx.ModelProto:
    """One GroupQueryAttention as the exporter writes it (packed q/k/v, rotary tables as initializers)."""
    f = TensorProto.FLOAT
    width = table_width if table_width is not None else head_dim // 2
    tables = [numpy_helper.from_array(np.zeros((32, width), np.float32), name) for name in ("cos", "sin")]
    inputs = [
        helper.make_tensor_value_info("qkv", f, ["B", "S", 8 * head_dim]),
        helper.make_tensor_value_info("past_key", f, ["B", 2, "T", head_dim]),
        helper.make_tensor_value_info("past_value", f, ["B", 2, "T", head_dim]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["B"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
    ]
    names = ["out", "present_key", "present_value", "qk"][:outputs]
    node = helper.make_node(
        "GroupQueryAttention",
        ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total_sequence_length", "cos", "sin"],
        names,
        domain="com.microsoft",
        **{"num_heads": 4, "kv_num_heads": 2, "do_rotary": 1, "rotary_interleaved": 0, **attrs},
    )
    graph = helper.make_graph(
        [node], "g", inputs, [helper.make_tensor_value_info(n, f, None) for n in names], initializer=tables
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )


def test_gqa_becomes_causal_attention_only_where_it_computes_the_same():
    model = gqa_model(
        local_window_size=-1, softcap=0.0, smooth_softmax=-1
    )  # defaults spelled out, as the optimizer does
    assert kernels.causal_attention(model) == 1
    (node,) = model.graph.node
    assert (node.op_type, node.domain) == ("CausalAttention", DOMAIN)
    assert list(node.input) == ["qkv", "past_key", "past_value", "seqlens_k", "total_sequence_length", "cos", "sin"]
    assert {a.name: a.i for a in node.attribute} == {"num_heads": 4, "kv_num_heads": 2}
    for kept in (
        gqa_model(local_window_size=8),  # a sliding window
        gqa_model(softcap=30.0),
        gqa_model(rotary_interleaved=1),
        gqa_model(head_dim=8),  # not a multiple of 16
        gqa_model(table_width=4),  # rotary on part of the head only
        gqa_model(outputs=4),  # the attention probabilities asked for
    ):
        assert kernels.causal_attention(kept) == 0 and kept.graph.node[0].op_type == "GroupQueryAttention"


def test_a_gated_mlp_becomes_one_swiglu_and_its_split_sizes_go():
    f = TensorProto.FLOAT
    sizes = numpy_helper.from_array(np.array([4, 4], np.int64), "sizes")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["gu"]),
        helper.make_node("Split", ["gu", "sizes"], ["g", "u"], axis=-1),
        helper.make_node("QuickGelu", ["g"], ["a"], domain="com.microsoft", alpha=1.0),
        helper.make_node("Mul", ["a", "u"], ["y"]),
    ]
    w = numpy_helper.from_array(np.zeros((4, 8), np.float32), "w")
    # an older writer's habit: the initializers listed as graph inputs too
    inputs = [
        helper.make_tensor_value_info("x", f, [1, 4]),
        helper.make_tensor_value_info("sizes", TensorProto.INT64, [2]),
    ]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", f, None)], initializer=[w, sizes])
    model = helper.make_model(graph)
    assert kernels.swiglu(model) == 1
    assert [(n.op_type, list(n.input), list(n.output)) for n in model.graph.node] == [
        ("MatMul", ["x", "w"], ["gu"]),
        ("SwiGLU", ["gu"], ["y"]),
    ]
    assert [i.name for i in model.graph.initializer] == ["w"] and [i.name for i in model.graph.input] == ["x"]


def test_causal_attention_takes_cache_rows_and_shared_prefixes_as_graph_inputs_empty_by_default():
    import onnxruntime as ort

    import ortkernels

    model = gqa_model()
    assert kernels.causal_attention(model) == 1
    kernels.address_cache(model)
    (node,) = model.graph.node
    assert list(node.input)[5:] == ["cos", "sin", "cache_rows", "prefix_rows", "prefix_lens"]
    defaults = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert all(defaults[name].shape == (0,) and defaults[name].dtype == np.int32 for name in kernels.ADDRESSING)
    dims = {
        v.name: v.type.tensor_type.shape.dim[0].dim_param for v in model.graph.input if v.type.tensor_type.shape.dim
    }
    assert dims["past_key"] == dims["past_value"] == kernels.CACHE_ROWS_DIM and dims["qkv"] == "B"
    if not ortkernels.available():
        return
    model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    model.ir_version = 10
    options = ort.SessionOptions()
    ortkernels.register(options)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((2, 1, 8 * 16)).astype(np.float32)
    cache = rng.standard_normal((3, 2, 32, 16)).astype(np.float32)  # three cache rows
    feed = {"qkv": qkv, "seqlens_k": np.array([5, 9], np.int32), "total_sequence_length": np.array(10, np.int32)}
    plain = session.run(["out"], {**feed, "past_key": cache[:2], "past_value": cache[:2]})[0]  # nothing addressed
    # rows 2 and 0 of the whole cache, row 0 reading its first 4 positions from row 1
    addressed = {"cache_rows": np.array([2, 0], np.int32), "prefix_rows": np.array([0, 1], np.int32)}
    addressed["prefix_lens"] = np.array([0, 4], np.int32)
    moved = rng.standard_normal((3, 2, 32, 16)).astype(np.float32)  # what no row reads
    moved[2] = cache[0]  # batch row 0's past, at cache row 2
    moved[0, :, 4:] = cache[1, :, 4:]  # batch row 1's own positions, at cache row 0 ...
    moved[1, :, :4] = cache[1, :, :4]  # ... its first four where it borrows them
    got = session.run(["out"], {**feed, **addressed, "past_key": moved, "past_value": moved})[0]
    np.testing.assert_allclose(got, plain, rtol=1e-5, atol=1e-5)
