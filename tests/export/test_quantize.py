"""A GGUF's Q4_1 blocks in one MatMulNBits: the minimums as exact 4-bit digits, and onnxruntime's product."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.checkpoints import PackedLinear
from export.kernels import swiglu_after
from export.quantize import BLOCK, _minimum_digits, _nbits_projection


def fp16_minimums(rng: np.random.Generator, n: int, nb: int) -> np.ndarray:
    """(n, nb) block minimums as Q4_1 stores them (fp16): mostly negative columns, and the awkward ones."""
    v = -(rng.random((n, nb)) * 0.2 + 0.002)
    v[0] *= -1  # a column of positive minimums
    v[1, ::2] *= -1  # mixed signs: balanced digits, zero point 8
    v[2] = 0  # all zero
    v[3, 0], v[3, 1] = 6e-8, 0.0  # an fp16 subnormal and a zero beside ordinary values
    v[4, 0] = 60000.0  # a wide spread: more digits
    return v.astype(np.float16).astype(np.float32)


@pytest.mark.parametrize("nb", [2, 18, 48])
def test_minimum_digits_rebuild_every_minimum_exactly(nb):
    v = fp16_minimums(np.random.default_rng(nb), 8, nb) * BLOCK
    q, scales, zero_points, spread = _minimum_digits(v)  # (N, D*P/32, 32), (N, D*P/32) x 2, (nb, D*P)
    assert q.min() >= 0 and q.max() <= 15 and set(np.unique(zero_points)) <= {0, 8}
    weights = ((q - zero_points[..., None]) * scales[..., None]).reshape(len(v), -1)  # (N, D*P), float64
    np.testing.assert_array_equal(weights @ spread.T.astype(np.float64), v)  # each digit times its 16^j, summed


def q4_1_blocks(rng: np.random.Generator, n: int, k: int) -> tuple[PackedLinear, np.ndarray, np.ndarray]:
    """Random Q4_1 rows (d, m fp16, 16 bytes of nibbles per 32 weights), the (n, k) matrix they describe and the
    (n, k/32) minimums."""
    nb = k // BLOCK
    d = (rng.random((n, nb)) * 0.02).astype(np.float16)
    m = fp16_minimums(rng, n, nb).astype(np.float16)
    q = rng.integers(0, 16, (n, nb, 32), dtype=np.uint8)
    nibbles = q[..., :16] | (q[..., 16:] << 4)  # GGUF: byte j holds q[j] (low) and q[j + 16] (high)
    raw = np.concatenate([d[..., None].view(np.uint8), m[..., None].view(np.uint8), nibbles], axis=-1)
    w = q.astype(np.float64) * d.astype(np.float64)[..., None] + m.astype(np.float64)[..., None]
    return PackedLinear("Q4_1", raw.reshape(n, -1), (n, k)), w.reshape(n, k), m.astype(np.float64)


@pytest.mark.parametrize("level, rtol", [(0, 1e-5), (4, 1e-2)])  # level 4: int8 activations (0.3% here)
def test_q4_1_projection_with_its_minimum_term_matches_the_blocks(level, rtol):
    rng = np.random.default_rng(0)
    parts = [q4_1_blocks(rng, n, 576) for n in (64, 32)]  # two parts side by side, as q/k/v are
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="/blocks.0/attn/qkv_proj/MatMul")
    inits, nodes = _nbits_projection(node, [p for p, _, _ in parts], "qkv", level)
    assert [n.op_type for n in nodes] == ["AveragePool", "MatMul", "Concat", "MatMulNBits"]
    graph = helper.make_graph(
        nodes,
        "projection",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, 576])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(
        graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((1, 5, 576)).astype(np.float32) + 0.5  # block sums far from zero: the term matters
    (y,) = session.run(None, {"x": x})  # (1, 5, 96)
    expected = x[0].astype(np.float64) @ np.concatenate([w for _, w, _ in parts]).T  # (5, 96)
    minimum_term = x[0].reshape(5, -1, BLOCK).sum(-1) @ np.concatenate([m for _, _, m in parts]).T  # (5, 96)
    atol = rtol * np.abs(expected).max()
    assert np.abs(minimum_term).max() > 10 * atol  # leaving it out would fail
    np.testing.assert_allclose(y[0], expected, rtol=0, atol=atol)


def swiglu_graph(alpha: float = 1.0, axis: int = -1, extra_reader: bool = False) -> onnx.GraphProto:
    """MatMul -> Split in halves -> QuickGelu(first) * second, as export/model.py writes a gated MLP."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["gu"], name="/blocks.0/mlp/gate_up_proj/MatMul"),
        helper.make_node("Split", ["gu", "sizes"], ["g", "u"], axis=axis),
        helper.make_node("QuickGelu", ["g"], ["a"], domain="com.microsoft", alpha=alpha),
        helper.make_node("Mul", ["a", "u"], ["y"]),
    ]
    if extra_reader:
        nodes.append(helper.make_node("Identity", ["a"], ["z"]))
    sizes = numpy_helper.from_array(np.array([8, 8], np.int64), "sizes")
    out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    return helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)], out, [sizes])


def test_swiglu_is_fused_only_where_it_is_exactly_silu_of_the_first_half_times_the_second():
    g = swiglu_graph()
    assert [n.op_type for n in swiglu_after(g.node[0], g) or []] == ["Split", "QuickGelu", "Mul"]
    for other in (swiglu_graph(alpha=1.702), swiglu_graph(axis=0), swiglu_graph(extra_reader=True)):
        assert swiglu_after(other.node[0], other) is None  # GELU's fit, another axis, a second reader
