"""The inspection graph: one prompt in, every layer's attention probabilities and the logits at every position out.

  input_ids   (1, S) int64      S <= max_tokens (the service enforces it; the graph's axis is dynamic)
  logits      (1, S, V) float32
  attention   (n_layer, H, S, S) float32   attention[l, h, q, k]: how much query q attends to key k in head h
                                           of layer l; each row sums to 1, exactly 0 above the diagonal

It is exported from the same torch model as the serving graph (`GPT.inspect`: the blocks with their attention
in plain ops instead of GroupQueryAttention) and holds no weights of its own: every initializer larger than
`onnx_export.save_model`'s inline threshold points into the serving graph's `model.onnx.data`, under the serving
graph's tensor name, at the same offset. (Llama's rotary tables, computed from the config rather than read from
the checkpoint, are Constant nodes inside both graph files, as the exporter writes them.) It is verified against
the torch model before it is written.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

from export.errors import ExportError
from export.model import GPT, KVCache, prefill

log = logging.getLogger(__name__)

FILE = "inspect.onnx"
DEFAULT_MAX_TOKENS = 256
# Against the torch fp32 model, per dtype of the weights: (max |probability difference|, max |logit difference|).
BOUNDS = {"fp32": (1e-4, 1e-3), "fp16": (1e-2, 0.5)}
ROW_SUM_TOLERANCE = 1e-4


class Inspector(torch.nn.Module):
    """`GPT.inspect` as a module's forward, for the exporter."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.inspect(input_ids)


def export_graph(model: GPT, work: Path) -> onnx.ModelProto:
    """Traces `GPT.inspect` (in the model's current dtype) and returns the graph with its weights loaded."""
    from export.onnx_export import OPSET

    tmp = work / "inspect.tmp.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Inspector(model.eval()),
            (torch.zeros(1, 5, dtype=torch.long),),
            str(tmp),
            input_names=["input_ids"],
            output_names=["logits", "attention"],
            dynamic_axes={
                "input_ids": {1: "sequence"},
                "logits": {1: "sequence"},
                "attention": {2: "sequence", 3: "sequence"},
            },
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )
    graph = onnx.load(str(tmp))  # external data, if the exporter wrote any, is read in
    for leftover in work.glob("inspect.tmp.onnx*"):
        leftover.unlink()
    for f in work.iterdir():  # the exporter's per-tensor files for models past 2 GB
        if f.is_file() and f.suffix not in (".onnx", ".data"):
            f.unlink()
    return graph


def _key(dtype: int, dims: list[int], data: bytes) -> tuple[int, tuple[int, ...], str]:
    return dtype, tuple(dims), hashlib.sha256(data).hexdigest()


def _constants_to_initializers(graph: onnx.ModelProto) -> None:
    """Large Constant nodes (Llama's rotary tables) become initializers, so they are shared like the weights."""
    keep = []
    for node in graph.graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None) if node.op_type == "Constant" else None
        if value is not None and len(numpy_helper.to_array(value).tobytes()) >= 1024:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value)
            tensor.name = node.output[0]
            graph.graph.initializer.append(tensor)
        else:
            keep.append(node)
    del graph.graph.node[:]
    graph.graph.node.extend(keep)


def share_weights(graph: onnx.ModelProto, serving: Path) -> tuple[onnx.ModelProto, int]:
    """Points every large initializer of `graph` at the identical tensor in the serving graph's external data file.

    Returns the graph and how many tensors it shares. Raises if a large tensor has no twin there, so the bundle
    never carries a second copy of a weight.
    """
    _constants_to_initializers(graph)
    served = onnx.load(str(serving), load_external_data=False)
    location = serving.name + ".data"
    twins: dict[tuple[int, tuple[int, ...], str], onnx.TensorProto] = {}
    with (serving.parent / location).open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        for t in served.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            ext = {e.key: e.value for e in t.external_data}
            if ext.get("location") != location:
                continue
            offset, length = int(ext.get("offset", 0)), int(ext["length"])
            twins.setdefault(_key(t.data_type, list(t.dims), data[offset : offset + length]), t)

    renames: dict[str, str] = {}
    shared: list[onnx.TensorProto] = []
    kept: list[onnx.TensorProto] = []
    for t in graph.graph.initializer:
        raw = numpy_helper.to_array(t).tobytes()
        if len(raw) < 1024:  # save_model keeps these inline in every graph too
            kept.append(t)
            continue
        twin = twins.get(_key(t.data_type, list(t.dims), raw))
        if twin is None:
            raise ExportError(
                f"inspection graph: initializer {t.name} {list(t.dims)} has no identical tensor in {serving.name}; "
                "refusing to store a second copy of a weight"
            )
        renames[t.name] = twin.name
        if twin.name not in {s.name for s in shared}:
            ref = onnx.TensorProto()
            ref.CopyFrom(twin)  # name, dtype, dims and the external-data entry (location, offset, length)
            shared.append(ref)
    taken = {s.name for s in shared}
    for t in kept:  # an inline tensor whose name the serving graph uses for another tensor
        if t.name in taken:
            renames[t.name] = t.name + ".inspect"
            t.name = renames[t.name]
    del graph.graph.initializer[:]
    graph.graph.initializer.extend(shared + kept)
    for node in graph.graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    return graph, len(shared)


def reference(model: GPT, prompts: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per prompt, from the torch fp32 model: the serving path's prefill logits (S, V) (GroupQueryAttention's
    reference, what the service computes) and `GPT.inspect`'s probabilities (n_layer, H, S, S)."""
    out = []
    for ids in prompts:
        logits = prefill(model, KVCache(model.config, 1, len(ids)), [ids])[0]
        with torch.no_grad():
            _, probs = model.inspect(torch.tensor([ids]))
        out.append((logits.numpy(), probs.numpy()))
    return out


def verify(
    path: Path, prompts: list[list[int]], expected: list[tuple[np.ndarray, np.ndarray]], dtype: str
) -> dict[str, Any]:
    """onnxruntime runs the written graph (its weights read from the serving graph's file) on `prompts` and is
    compared with `reference`'s outputs; raises past the bounds."""
    max_prob, max_logit = BOUNDS[dtype]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = {"max_abs_prob_diff": 0.0, "max_row_sum_error": 0.0, "max_above_diagonal": 0.0, "max_abs_logit_diff": 0.0}
    for ids, (want_logits, want_probs) in zip(prompts, expected):
        logits, attention = session.run(None, {"input_ids": np.array([ids], dtype=np.int64)})
        upper = np.triu(np.ones((len(ids), len(ids)), dtype=bool), k=1)
        for key, value in (
            ("max_abs_prob_diff", np.abs(attention - want_probs).max()),
            ("max_row_sum_error", np.abs(attention.sum(-1) - 1).max()),
            ("max_above_diagonal", np.abs(attention[..., upper]).max(initial=0.0)),
            ("max_abs_logit_diff", np.abs(logits[0] - want_logits).max()),
        ):
            worst[key] = max(worst[key], float(value))
    report = {
        **worst,
        "prompt_lengths": [len(p) for p in prompts],
        "bounds": {
            "max_abs_prob_diff": max_prob,
            "max_row_sum_error": ROW_SUM_TOLERANCE,
            "max_above_diagonal": 0.0,
            "max_abs_logit_diff": max_logit,
        },
    }
    if not (
        worst["max_abs_prob_diff"] <= max_prob
        and worst["max_row_sum_error"] <= ROW_SUM_TOLERANCE
        and worst["max_above_diagonal"] == 0.0
        and worst["max_abs_logit_diff"] <= max_logit
    ):
        raise ExportError(f"inspection graph verification failed: {report}")
    return report


def contract(n_layer: int, n_head: int, vocab_size: int, max_tokens: int) -> dict[str, Any]:
    """The manifest's `inspect` entry (besides the verification report)."""
    return {
        "file": FILE,
        "weights": "shared with graph.file (same external-data file, tensor names and offsets)",
        "max_tokens": max_tokens,
        "inputs": {"input_ids": {"dtype": "int64", "shape": [1, "sequence"]}},
        "outputs": {
            "logits": {"dtype": "float32", "shape": [1, "sequence", vocab_size]},
            "attention": {"dtype": "float32", "shape": [n_layer, n_head, "sequence", "sequence"]},
        },
    }


def write(
    model: GPT,
    bundle_dir: Path,
    work: Path,
    prompts: list[list[int]],
    expected: list[tuple[np.ndarray, np.ndarray]],
    dtype: str,
    max_tokens: int,
) -> dict[str, Any]:
    """Exports, points at the serving graph's weights, writes `bundle_dir/inspect.onnx`, verifies it against
    `expected` (from `reference`, computed before the model was cast). `model` is in the serving graph's dtype:
    its weights must match `model.onnx.data` byte for byte. Returns the manifest entry."""
    graph = export_graph(model, work)
    graph, n_shared = share_weights(graph, bundle_dir / "model.onnx")
    path = bundle_dir / FILE
    onnx.save_model(graph, str(path))  # the shared tensors stay references; nothing else is large
    log.info("wrote %s (%d tensors shared with model.onnx)", path, n_shared)
    report = verify(path, prompts, expected, dtype)
    cfg = model.config
    return {
        **contract(cfg.n_layer, cfg.n_head, cfg.vocab_size, max_tokens),
        "shared_tensors": n_shared,
        "parity": report,
    }


def summary(entry: dict[str, Any]) -> str:
    r = entry["parity"]
    return (
        f"up to {entry['max_tokens']} tokens, {entry['shared_tensors']} weights shared with the serving graph; "
        f"max|dprob| {r['max_abs_prob_diff']:.1e}, max|row sum - 1| {r['max_row_sum_error']:.1e}, "
        f"above the diagonal {r['max_above_diagonal']:g}, max|dlogit| {r['max_abs_logit_diff']:.1e} ok"
    )
