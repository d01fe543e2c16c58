"""torch -> ONNX: the decoder with named, dynamic-axis inputs/outputs and one GroupQueryAttention per layer.

The I/O contract (also written to the manifest by `io_contract`):
  input_ids               (B, S) int64
  position_ids            (B, S) int64
  seqlens_k               (B,)   int32   total length after this step - 1, per row
  total_sequence_length   ()     int32   max over rows of seqlens_k + 1
  past_key_values.{i}.key / .value   (B, H_kv, T_max, D)  cache dtype
  logits                  (B, S, V) float32
  present.{i}.key / .value           (B, H_kv, T_max, D)  the same buffers as past (bind them to one OrtValue)
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


def io_contract(config: ModelConfig, cache_dtype: str) -> dict[str, Any]:
    past, present = cache_names(config.n_layer)
    cache_shape = ["batch", config.n_kv_head, "max_cache_len", config.head_dim]
    return {
        "inputs": {
            "input_ids": {"dtype": "int64", "shape": ["batch", "sequence"]},
            "position_ids": {"dtype": "int64", "shape": ["batch", "sequence"]},
            "seqlens_k": {"dtype": "int32", "shape": ["batch"]},
            "total_sequence_length": {"dtype": "int32", "shape": []},
            **{n: {"dtype": cache_dtype, "shape": cache_shape} for n in past},
        },
        "outputs": {
            "logits": {"dtype": "float32", "shape": ["batch", "sequence", config.vocab_size]},
            **{n: {"dtype": cache_dtype, "shape": cache_shape} for n in present},
        },
        "cache": {
            "layout": "batch, kv_heads, max_cache_len, head_dim",
            "past_present_share_buffer": True,
            "attention_op": "com.microsoft::GroupQueryAttention",
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
        torch.arange(S).expand(B, S).contiguous(),
        torch.full((B,), S - 1, dtype=torch.int32),
        torch.tensor(S, dtype=torch.int32),
        *cache,
    )
    inputs = ["input_ids", "position_ids", "seqlens_k", "total_sequence_length", *past]
    outputs = ["logits", *present]
    dynamic: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        "seqlens_k": {0: "batch"},
        "logits": {0: "batch", 1: "sequence"},
        **{n: {0: "batch", 2: "max_cache_len"} for n in past + present},
    }
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
    tmp.unlink()
    for leftover in tmp.parent.glob("*.tmp.onnx*"):
        leftover.unlink()
    save_model(graph, path)
    log.info("wrote %s", path)


def save_model(graph: onnx.ModelProto, path: Path) -> None:
    """One graph file plus one external-data file beside it (the weights), whatever the model's size."""
    data = path.name + ".data"
    (path.parent / data).unlink(missing_ok=True)
    onnx.save_model(
        graph, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data, size_threshold=1024
    )
