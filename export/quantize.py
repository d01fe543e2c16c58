"""int8 and int4 variants of an fp32 graph, with onnxruntime's own quantizers or a GGUF's own 4-bit blocks.

- int8: dynamic quantization of the MatMul weights (onnxruntime.quantization.quantize_dynamic, per channel).
- int4: weight-only MatMulNBits (block 32, asymmetric) from onnxruntime's MatMulNBitsQuantizer.
- int4 from a GGUF whose linears are Q4_0/Q4_1: the file's blocks go into MatMulNBits as they are, so nothing is
  rounded twice (see carry_gguf_blocks); tensors the file keeps more precise (the tied Q8_0 embedding) stay fp32.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from export.checkpoints import PackedLinear
from export.onnx_export import save_model

log = logging.getLogger(__name__)

BLOCK = 32
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 on every MatMul but the MLP down projections and the unembedding.

    Dynamic quantization rounds activations per tensor; the inputs of down_proj carry outliers that this
    destroys (SmolLM2-135M: held-out perplexity 15.59 fp32 -> 25.35 with them quantized, 16.72 without).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    names = [n.name for n in onnx.load(str(src), load_external_data=False).graph.node if n.op_type == "MatMul"]
    keep_fp32 = [n for n in names if "/down_proj/" in n or n.startswith("/lm_head/")]
    quantize_dynamic(
        src,
        dst,
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        weight_type=QuantType.QInt8,
        use_external_data_format=True,
        extra_options={"MatMulConstBOnly": True},
        nodes_to_exclude=keep_fp32,
    )
    save_model(onnx.load(str(dst)), dst)  # one external-data file with a predictable name


def quantize_int4(src: Path, dst: Path, accuracy_level: int) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=BLOCK, is_symmetric=False, accuracy_level=accuracy_level)
    quantizer.process()
    save_model(quantizer.model.model, dst)


def carry_gguf_blocks(src: Path, dst: Path, packed: dict[str, PackedLinear], accuracy_level: int) -> int:
    """Replaces each MatMul whose weight the GGUF stores in Q4_0/Q4_1 by MatMulNBits over those blocks.

    Q4_0 (w = d·(q − 8)) is MatMulNBits with scale d and zero point 8. Q4_1 (w = d·q + m) is split in two exact
    terms: MatMulNBits with scale d and zero point 0, plus the per-block minimums times the block sums of the input,
    (…, K/32) @ (K/32, N), a small fp32 MatMul. (A float zero point −m/d would express it in one node, but
    onnxruntime's CPU kernel then takes a path 20-40x slower than the integer one.)

    The unembedding, when the file stores it in Q8_0, becomes an 8-bit MatMulNBits (q + 128, zero point 128), but
    only with int8 activations (accuracy level 4): onnxruntime's 8-bit kernel is 100x slower in fp32 compute, so at
    lower levels it stays fp32. Either way nothing is rounded below the file's own precision.
    """
    model = onnx.load(str(src))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    replaced = 0
    for node in list(graph.node):
        # The TorchScript exporter names nodes by module scope: /blocks.3/attn/q_proj/MatMul
        m = re.fullmatch(r"/(blocks\.\d+)/(attn|mlp)/(\w+_proj)/MatMul", node.name)
        if node.op_type != "MatMul" or (m is None and node.name != "/lm_head/MatMul"):
            continue
        weight = f"{m[1]}.{m[2]}.{m[3]}.weight" if m else "lm_head.weight"
        if weight == "lm_head.weight" and accuracy_level < 4:
            continue
        if weight not in packed or node.input[1] not in inits:
            continue
        p = packed[weight]
        b, scales, zero_points, mins = _to_matmul_nbits(p)
        N, K = p.shape
        bits = 8 if p.qtype == "Q8_0" else 4
        prefix = weight.removesuffix(".weight")
        new_inits = [
            numpy_helper.from_array(b, f"{prefix}.qweight"),
            numpy_helper.from_array(scales, f"{prefix}.scales"),
            numpy_helper.from_array(zero_points, f"{prefix}.zero_points"),
        ]
        x, y = node.input[0], node.output[0]
        nbits_out = y if mins is None else f"{node.name}/nbits_out"
        new_nodes = [
            helper.make_node(
                "MatMulNBits",
                [x, *(i.name for i in new_inits)],
                [nbits_out],
                name=node.name + "NBits",
                domain="com.microsoft",
                K=K,
                N=N,
                bits=bits,
                block_size=BLOCK,
                accuracy_level=accuracy_level,
            )
        ]
        if mins is not None:  # + blocksum(x) @ mins^T: x (..., K) -> (..., K/32, 32) -> (..., K/32) -> (..., N)
            new_inits += [
                numpy_helper.from_array(np.array([0, 0, K // BLOCK, BLOCK], np.int64), f"{prefix}.block_shape"),
                numpy_helper.from_array(np.array([-1], np.int64), f"{prefix}.last_axis"),
                numpy_helper.from_array(np.ascontiguousarray(mins.T), f"{prefix}.mins_t"),  # (K/32, N)
            ]
            n = node.name
            new_nodes += [
                helper.make_node("Reshape", [x, f"{prefix}.block_shape"], [f"{n}/blocks"], name=f"{n}/Reshape"),
                helper.make_node(
                    "ReduceSum",
                    [f"{n}/blocks", f"{prefix}.last_axis"],
                    [f"{n}/block_sums"],
                    name=f"{n}/ReduceSum",
                    keepdims=0,
                ),
                helper.make_node(
                    "MatMul", [f"{n}/block_sums", f"{prefix}.mins_t"], [f"{n}/min_term"], name=f"{n}/MinsMatMul"
                ),
                helper.make_node("Add", [nbits_out, f"{n}/min_term"], [y], name=f"{n}/Add"),
            ]
        graph.initializer.extend(new_inits)
        idx = list(graph.node).index(node)
        graph.node.remove(node)
        for k, new_node in enumerate(new_nodes):
            graph.node.insert(idx + k, new_node)
        graph.initializer.remove(inits.pop(node.input[1]))
        replaced += 1
    save_model(model, dst)
    return replaced


def _to_matmul_nbits(p: PackedLinear) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """GGUF rows of blocks -> MatMulNBits' B (N, K/32, 16) uint8, scales (N*K/32,), packed uint8 zero points,
    and for Q4_1 the per-block minimums (N, K/32) that the separate exact min term adds back."""
    N, K = p.shape
    nb = K // BLOCK
    blocks = p.blocks.reshape(N, nb, _BLOCK_BYTES[p.qtype])
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)[..., 0]  # (N, nb)
    if p.qtype == "Q8_0":  # w = d * q, q int8 -> MatMulNBits 8-bit: (q + 128 - 128) * d, zero points unpacked
        q8 = (blocks[..., 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)  # (N, nb, 32)
        return q8, d.reshape(-1), np.full(N * nb, 128, np.uint8), None
    if p.qtype == "Q4_1":
        mins = blocks[..., 2:4].copy().view(np.float16).astype(np.float32)[..., 0]  # (N, nb)
        qs = blocks[..., 4:20]
        zp_value = 0  # w = d*q + m: (q - 0) * d here, m through the min term
    else:
        mins = None
        qs = blocks[..., 2:18]
        zp_value = 8  # w = d * (q - 8)
    # GGUF: byte j holds q[j] (low nibble) and q[j+16] (high); MatMulNBits: byte i holds q[2i] (low), q[2i+1] (high)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # (N, nb, 32) in element order
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)  # (N, nb, 16)
    zero_points = np.full((N, (nb + 1) // 2), zp_value | (zp_value << 4), np.uint8).reshape(-1)
    return packed, d.reshape(-1), zero_points, mins
