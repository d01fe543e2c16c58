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
