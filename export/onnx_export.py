"""torch -> ONNX: the decoder with named, dynamic-axis inputs/outputs and a handful of fused operators per layer.

The I/O contract (also written to the manifest by `io_contract`):
  input_ids               (B, S) int64
  position_ids            (B, S) int64   GPT-2 only (learned positions); Llama rotates by seqlens_k inside attention
  seqlens_k               (B,)   int32   total length after this step - 1, per row
  total_sequence_length   ()     int32   max over rows of seqlens_k + 1
  logits_index            (N,)   int64   rows of the flattened (B*S) positions whose logits are computed
  past_key_values.{i}.key / .value   (B, H_kv, T_max, D)  cache dtype
  logits                  (N, V) float32
  present.{i}.key / .value           (B, H_kv, T_max, D)  the same buffers as past (bind them to one OrtValue)
Rewritten onto the project's CausalAttention (export/kernels.py), a graph also takes, each empty by default:
  cache_rows, prefix_rows, prefix_lens   (B,) int32   each row's cache row (the cache then bound whole: N >= B rows
                                                      as its first dimension), and the row and length of a shared
                                                      prefix it reads its first positions from
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch

from export.config import ModelConfig
from export.model import GPT

log = logging.getLogger(__name__)

OPSET = 17


def cache_names(n_layer: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kind}" for i in range(n_layer) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(n_layer) for kind in ("key", "value")]
    return past, present


def input_names(config: ModelConfig) -> list[str]:
    positions = ["position_ids"] if config.family == "gpt2" else []
    return ["input_ids", *positions, "seqlens_k", "total_sequence_length", "logits_index"]


ADDRESSING = ("cache_rows", "prefix_rows", "prefix_lens")  # the inputs of a graph on CausalAttention, (B,) int32 each
CACHE_ROWS_DIM = "cache_slots"  # the cache's first dimension in such a graph: the cache bound whole, N rows


def io_contract(config: ModelConfig, cache_dtype: str, addressed: bool = False) -> dict[str, Any]:
    """`addressed`: the graph's attention is the project's CausalAttention with export/kernels.py's three inputs
    (the cache bound whole, its rows and shared prefixes given per batch row)."""
    past, present = cache_names(config.n_layer)
    cache_shape = [CACHE_ROWS_DIM if addressed else "batch", config.n_kv_head, "max_cache_len", config.head_dim]
    rows = {"dtype": "int32", "shape": ["batch"], "default": "empty (not given)"}
    shapes: dict[str, dict[str, Any]] = {
        "input_ids": {"dtype": "int64", "shape": ["batch", "sequence"]},
        "position_ids": {"dtype": "int64", "shape": ["batch", "sequence"]},
        "seqlens_k": {"dtype": "int32", "shape": ["batch"]},
        "total_sequence_length": {"dtype": "int32", "shape": []},
        "logits_index": {"dtype": "int64", "shape": ["logits_rows"]},
    }
    return {
        "inputs": {
            **{n: shapes[n] for n in input_names(config)},
            **(dict.fromkeys(ADDRESSING, rows) if addressed else {}),
            **{n: {"dtype": cache_dtype, "shape": cache_shape} for n in past},
        },
        "outputs": {
            "logits": {"dtype": "float32", "shape": ["logits_rows", config.vocab_size]},
            **{n: {"dtype": cache_dtype, "shape": cache_shape} for n in present},
        },
        "cache": {
            "layout": "batch, kv_heads, max_cache_len, head_dim",
            "past_present_share_buffer": True,
            "attention_op": "com.microsoft::GroupQueryAttention",  # its contract (CausalAttention keeps it)
            "rows_addressed": addressed,  # cache_rows, prefix_rows, prefix_lens
            "rotary": "inside attention, positions from seqlens_k" if config.family == "llama" else None,
            "n_layer": config.n_layer,
            "kv_heads": config.n_kv_head,
            "head_dim": config.head_dim,
        },
    }


def export_onnx(model: GPT, path: Path, dtype: torch.dtype = torch.float32) -> None:
    """Writes `path` (graph) and `path.data` (weights as external data)."""
    config = model.config
    model = model.to(dtype).eval()
    B, S, T = 2, 3, 8  # sample shapes for tracing; every axis below is dynamic
    past, present = cache_names(config.n_layer)
    cache = [torch.zeros(B, config.n_kv_head, T, config.head_dim, dtype=dtype) for _ in past]
    args = (
        torch.zeros(B, S, dtype=torch.long),
        torch.arange(S).expand(B, S).contiguous() if config.family == "gpt2" else None,
        torch.full((B,), S - 1, dtype=torch.int32),
        torch.tensor(S, dtype=torch.int32),
        torch.arange(B * S),
        *cache,
    )
    inputs = [*input_names(config), *past]
    outputs = ["logits", *present]
    dynamic: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        "seqlens_k": {0: "batch"},
        "logits_index": {0: "logits_rows"},
        "logits": {0: "logits_rows"},
        **{n: {0: "batch", 2: "max_cache_len"} for n in past + present},
    }
    dynamic = {k: v for k, v in dynamic.items() if k in inputs + outputs}
    tmp = path.with_suffix(".tmp.onnx")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about int(total_len): the symbolic replaces that code
        torch.onnx.export(
            model,
            args,
            str(tmp),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
            custom_opsets={"com.microsoft": 1},
        )
    graph = onnx.load(str(tmp))
    drop_unused_outputs(graph)
    constants_to_initializers(graph)
    tmp.unlink()
    for leftover in tmp.parent.glob("*.tmp.onnx*"):
        leftover.unlink()
    save_model(graph, path)
    if dtype == torch.float32:
        optimize(path)
    log.info("wrote %s", path)


def optimize(path: Path) -> None:
    """Replaces the fp32 graph at `path` by onnxruntime's own optimization of it (level `extended`), the graph a
    session runs: it fuses what the export leaves (GPT-2's bias adds into SkipLayerNormalization and FastGelu).

    fp16 graphs, meant for the GPU, are saved as exported: optimizing them in a CPU session would bake in what the
    CPU provider does to ops without fp16 kernels (Casts around them, QuickGelu and FastGelu expanded).
    """
    import onnxruntime as ort

    out = path.with_name("optimized." + path.name)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.log_severity_level = 3
    options.optimized_model_filepath = str(out)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", out.name + ".data")
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(str(out))
    out.unlink()
    out.with_name(out.name + ".data").unlink(missing_ok=True)
    save_model(graph, path)


def drop_unused_outputs(model: onnx.ModelProto) -> None:
    """Blanks node outputs nothing reads (a fused norm's mean and inv_std_var), so onnxruntime does not produce them."""
    graph = model.graph
    read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for node in graph.node:
        for k, name in enumerate(node.output):
            if k > 0 and name not in read:
                node.output[k] = ""


def constants_to_initializers(model: onnx.ModelProto) -> None:
    """Constant nodes (split sizes, shapes, the rotary tables) become initializers: no Constant nodes in the graph."""
    graph = model.graph
    for node in [n for n in graph.node if n.op_type == "Constant"]:
        (attr,) = node.attribute
        if attr.name != "value":
            continue
        tensor = onnx.TensorProto()
        tensor.CopyFrom(attr.t)
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
        graph.node.remove(node)


def save_model(graph: onnx.ModelProto, path: Path) -> None:
    """One graph file plus one external-data file beside it (the weights), whatever the model's size."""
    data = path.name + ".data"
    (path.parent / data).unlink(missing_ok=True)
    onnx.save_model(
        graph, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data, size_threshold=1024
    )
