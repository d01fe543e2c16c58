"""fp32 graphs onto the project's own CPU ops (ortkernels/), where the library is built: after the export (and after
quantization), before the parity check that verifies the graph the bundle ships.

- each GroupQueryAttention -> CausalAttention: the same contract, only the causal half of a prompt's scores; and
  three graph inputs for it, int32 (B,), empty by default: cache_rows (the cache row of each batch row: the cache is
  then bound whole, N rows), prefix_rows and prefix_lens (each row's positions below prefix_lens read from row
  prefix_rows: a prefix held once for every sequence sharing it; service/prefix_cache.py);
- a gated MLP's Split, QuickGelu (alpha 1) and Mul after its gate/up projection -> SwiGLU, one node.

A graph with these ops lists them in the manifest (`graph.kernels`); the service refuses it, by name, where the library
is not built. fp16 graphs (the GPU's) keep onnxruntime's ops.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from export.onnx_export import ADDRESSING, CACHE_ROWS_DIM, save_model
from ortkernels import DOMAIN


def rewrite(path: Path) -> dict[str, int]:
    """Rewrites the fp32 graph at `path` in place onto CausalAttention and SwiGLU. -> how many nodes of each."""
    model = onnx.load(str(path))
    counts = {"CausalAttention": causal_attention(model), "SwiGLU": swiglu(model)}
    if counts["CausalAttention"]:
        address_cache(model)
    if any(counts.values()):
        if DOMAIN not in {o.domain for o in model.opset_import}:
            model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
        save_model(model, path)
    return counts


# GroupQueryAttention attributes CausalAttention (ortkernels/attention.c) computes the same with: their defaults, as
# the exporter writes them and onnxruntime's optimizer spells them out
_GQA_DEFAULTS = {
    "rotary_interleaved": 0,
    "local_window_size": -1,
    "softcap": 0.0,
    "scale": 0.0,
    "smooth_softmax": (-1, 0),
    "qk_output": 0,
    "causal": 1,
    "sliding_window_cache": 0,
    "k_quant_type": b"NONE",
    "v_quant_type": b"NONE",
}


def causal_attention(model: onnx.ModelProto) -> int:
    """Each GroupQueryAttention becomes the project's CausalAttention
    (ortkernels/attention.c: the same inputs less the two empty ones, the same outputs and cache contract; only the
    causal half of a prompt's scores computed). A node with an attribute CausalAttention does not compute, more than
    16 query heads per kv head, or a head size not a multiple of 16 stays as it is. -> how many were rewritten."""
    n = 0
    for node in model.graph.node:
        if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        heads, kv_heads = attrs.get("num_heads", 0), attrs.get("kv_num_heads", 0)
        qkv, key, value, *rest = node.input  # packed q/k/v; key and value empty
        if key or value or not kv_heads or heads % kv_heads or heads // kv_heads > 16 or len(node.output) > 3:
            continue
        if any(
            name in attrs and attrs[name] not in (default if isinstance(default, tuple) else (default,))
            for name, default in _GQA_DEFAULTS.items()
        ):
            continue
        if set(attrs) - set(_GQA_DEFAULTS) - {"num_heads", "kv_num_heads", "do_rotary", "qk_norm_epsilon"}:
            continue
        past_k, past_v, seqlens_k, total, *tables = rest
        rotary = bool(attrs.get("do_rotary", 0))
        if rotary != bool(tables) or len(tables) not in (0, 2):
            continue
        head_dim = _head_dim(model, past_k)
        if head_dim is None or head_dim % 16 or head_dim > 1024 or heads > 4096:
            continue
        if rotary and any(_last_dim(model, table) != head_dim // 2 for table in tables):  # rotary on the whole head
            continue
        del node.input[:]
        node.input.extend([qkv, past_k, past_v, seqlens_k, total, *tables])
        del node.attribute[:]
        node.attribute.extend(
            [onnx.helper.make_attribute("num_heads", heads), onnx.helper.make_attribute("kv_num_heads", kv_heads)]
        )
        node.op_type, node.domain = "CausalAttention", DOMAIN
        n += 1
    return n


def address_cache(model: onnx.ModelProto) -> None:
    """Gives every CausalAttention the graph inputs cache_rows, prefix_rows and prefix_lens (int32 (B,), each an
    empty initializer by default, which the op reads as not given: a caller that feeds none runs the graph as
    GroupQueryAttention's contract), and names the cache's first dimension apart from the batch's."""
    graph = model.graph
    for name in ADDRESSING:
        graph.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT32, ["batch"]))
        graph.initializer.append(numpy_helper.from_array(np.zeros(0, np.int32), name))
    attention = [node for node in graph.node if node.op_type == "CausalAttention" and node.domain == DOMAIN]
    for node in attention:  # inputs 7-9, after the optional rotary tables
        node.input.extend([""] * (7 - len(node.input)) + list(ADDRESSING))
    cache = {name for node in attention for name in (*node.input[1:3], *node.output[1:])}
    for value in [*graph.input, *graph.output]:
        if value.name in cache and value.type.tensor_type.shape.dim:  # (where a shape is declared)
            value.type.tensor_type.shape.dim[0].dim_param = CACHE_ROWS_DIM


def _last_dim(model: onnx.ModelProto, initializer: str) -> int | None:
    """The last dimension of an initializer (a rotary table: (T, D/2)), where there is one of that name."""
    for tensor in model.graph.initializer:
        if tensor.name == initializer:
            return int(tensor.dims[-1]) if tensor.dims else None
    return None


def _head_dim(model: onnx.ModelProto, cache_input: str) -> int | None:
    """The last dimension of a graph input (a cache: (B, H_kv, T_max, D)), where it is a number."""
    for value in model.graph.input:
        if value.name == cache_input:
            dims = value.type.tensor_type.shape.dim
            return dims[-1].dim_value or None if dims else None
    return None


def swiglu(model: onnx.ModelProto) -> int:
    """Each gated MLP's Split, QuickGelu and Mul after its gate/up projection becomes one SwiGLU (silu of the first
    half times the second). -> how many."""
    graph = model.graph
    n = 0
    for node in list(graph.node):  # a projection of any form: MatMul, MatMulNBits and what adds its minimum term
        fused = swiglu_after(node, graph)
        if fused is None:
            continue
        split, _, mul = fused
        at = list(graph.node).index(split)
        graph.node.insert(
            at,
            onnx.helper.make_node("SwiGLU", [node.output[0]], list(mul.output), split.name + "/SwiGLU", domain=DOMAIN),
        )
        sizes = split.input[1]
        for old in fused:
            graph.node.remove(old)
        if not any(sizes in n.input for n in graph.node):  # the Split's sizes, read by nothing now
            graph.initializer.remove(next(i for i in graph.initializer if i.name == sizes))
            for listed in [i for i in graph.input if i.name == sizes]:  # an older writer lists initializers as inputs
                graph.input.remove(listed)
        n += 1
    return n


def swiglu_after(node: onnx.NodeProto, graph: onnx.GraphProto) -> list[onnx.NodeProto] | None:
    """[Split, QuickGelu, Mul] when a projection's output is only split in two halves, silu (QuickGelu with alpha 1)
    taken of the first and multiplied by the second, as export/model.py writes a gated MLP; else None."""

    def readers(name: str) -> list[onnx.NodeProto]:
        return [n for n in graph.node if name in n.input]

    split = readers(node.output[0])
    axis = [a.i for a in split[0].attribute if a.name == "axis"] if len(split) == 1 else []
    if len(split) != 1 or split[0].op_type != "Split" or len(split[0].output) != 2 or axis != [-1]:
        return None
    act, mul = readers(split[0].output[0]), readers(split[0].output[1])
    alpha = [a.f for a in act[0].attribute if a.name == "alpha"] if len(act) == 1 else []
    if len(act) != 1 or act[0].op_type != "QuickGelu" or alpha != [1.0]:  # its default, 1.702, is GELU's fit
        return None
    sizes = [numpy_helper.to_array(i) for i in graph.initializer if i.name == split[0].input[-1]]
    if len(split[0].input) != 2 or len(sizes) != 1 or len(set(sizes[0].tolist())) != 1:  # two equal halves
        return None
    if len(mul) != 1 or mul[0].op_type != "Mul" or set(mul[0].input) != {act[0].output[0], split[0].output[1]}:
        return None
    if readers(act[0].output[0]) != mul or {node.output[0], *split[0].output, *act[0].output} & {
        o.name for o in graph.output
    }:  # nothing else reads what the fused node no longer writes
        return None
    return [split[0], act[0], mul[0]]
