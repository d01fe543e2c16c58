"""A decode step's logits reduced on the device that computed them to what the sampler reads of most rows.

A decode step's logits are V = 49,152 floats a row; the sampler needs few of them for most rows. On
CUDA a decode call asked to (`reduce`) leaves them on the device and returns sampler.Candidates instead: each row's
128 largest logits, its logits at the ids its penalties change, its log-sum-exp and its mass at its temperature,
made by a small graph of the engine's own (LogitReducer); the full logits are copied only for a row those do not
settle. On an H200, 16 rows sampled at SmolLM2's defaults: a step 7.1 -> 2.9 ms, 16 streamed chats 1.7-2.5x the
tokens/s (docs/BENCHMARKS.md). Off on the CPU, where the logits are on the host already and numpy is as fast.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from service.sampler import Candidates

if TYPE_CHECKING:
    from service.engine import Engine

# Candidates (service/sampler.py): the largest logits a decode step returns per row, enough for top-k up to it and
# for the nuclei of the usual temperatures and top-p.
CANDIDATES = 128


class LogitReducer:
    """A decode step's logits (D, V) reduced, on the device that computed them, to what the sampler needs of most
    rows (service/sampler.py Candidates): each row's K largest logits and their ids (TopK), its raw logits at the
    ids its penalties change (GatherElements), its log-sum-exp (logprobs), its mass at its own temperature (top-p)
    and the sum of its logits times zero (nan where a logit is inf or nan). A small graph of its own, on the engine's
    providers, reading the logits where the step left them."""

    OUTPUTS = ("values", "ids", "edit_values", "lse", "mass", "probe")

    def __init__(self, engine: Engine) -> None:
        from onnx import TensorProto, helper

        self.engine, self.k = engine, min(CANDIDATES, engine.bundle.vocab_size)
        i64 = TensorProto.INT64
        graph = helper.make_graph(
            [
                helper.make_node("TopK", ["logits", "k"], ["values", "ids"], axis=1, largest=1, sorted=1),
                helper.make_node("Slice", ["values", "zero", "one", "one"], ["top"]),  # (D, 1)
                helper.make_node("Sub", ["logits", "top"], ["shifted"]),
                helper.make_node("Mul", ["shifted", "inv_temperature"], ["scaled"]),  # (D, V)
                helper.make_node("Exp", ["scaled"], ["weights"]),
                helper.make_node("ReduceSum", ["weights", "one"], ["mass"], keepdims=0),  # (D,)
                helper.make_node("Exp", ["shifted"], ["unscaled"]),  # the log-sum-exp, from the row's top
                helper.make_node("ReduceSum", ["unscaled", "one"], ["sum"], keepdims=0),
                helper.make_node("Log", ["sum"], ["log_sum"]),
                helper.make_node("Squeeze", ["top", "one"], ["top_1d"]),
                helper.make_node("Add", ["log_sum", "top_1d"], ["lse"]),
                helper.make_node("Mul", ["logits", "nothing"], ["zeros"]),  # nan where a logit is inf or nan
                helper.make_node("ReduceSum", ["zeros", "one"], ["probe"], keepdims=0),  # (ReduceMin: 2.5 ms on CUDA)
                helper.make_node("GatherElements", ["logits", "edit_ids"], ["edit_values"], axis=1),  # (D, G)
            ],
            "reduce_logits",
            [
                helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["D", engine.bundle.vocab_size]),
                helper.make_tensor_value_info("inv_temperature", TensorProto.FLOAT, ["D", 1]),
                helper.make_tensor_value_info("edit_ids", i64, ["D", "G"]),
            ],
            [
                helper.make_tensor_value_info("values", TensorProto.FLOAT, ["D", self.k]),
                helper.make_tensor_value_info("ids", i64, ["D", self.k]),
                helper.make_tensor_value_info("edit_values", TensorProto.FLOAT, ["D", "G"]),
                helper.make_tensor_value_info("lse", TensorProto.FLOAT, ["D"]),
                helper.make_tensor_value_info("mass", TensorProto.FLOAT, ["D"]),
                helper.make_tensor_value_info("probe", TensorProto.FLOAT, ["D"]),
            ],
            [
                helper.make_tensor("k", i64, [1], [self.k]),
                helper.make_tensor("zero", i64, [1], [0]),
                helper.make_tensor("one", i64, [1], [1]),
                helper.make_tensor("nothing", TensorProto.FLOAT, [], [0.0]),
            ],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # on the calling thread: a pool of its own would spin beside the model's
        options.log_severity_level = 3
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=engine.providers)

    def run(
        self, logits: ort.OrtValue | np.ndarray, inv_t: np.ndarray, edits: np.ndarray, full: Callable[[], np.ndarray]
    ) -> Candidates:
        """logits (D, V) on the device or the host, inv_t (D,) float32, edits (D, G) int64 padded with -1 -> the
        rows' Candidates; `full` fetches the logits to the host."""
        e, b = self.engine, self.session.io_binding()
        if isinstance(logits, np.ndarray):
            b.bind_cpu_input("logits", logits)
        else:
            b.bind_ortvalue_input("logits", logits)
        b.bind_cpu_input("inv_temperature", np.ascontiguousarray(inv_t, np.float32)[:, None])
        b.bind_cpu_input("edit_ids", np.maximum(edits, 0))
        for name in self.OUTPUTS:
            b.bind_output(name, e.device)
        self.session.run_with_iobinding(b)
        values, ids, edit_values, lse, mass, probe = (o.numpy() for o in b.get_outputs())
        finite = np.isfinite(lse) & np.isfinite(probe)
        return Candidates(ids, values, edits, edit_values, lse, mass, finite, full)
