"""int8 and int4 variants of an fp32 graph, with onnxruntime's own quantizers or a GGUF's own 4-bit blocks.

- int8: dynamic quantization of the MatMul weights (onnxruntime.quantization.quantize_dynamic, per channel).
- int4: weight-only MatMulNBits (block 32, asymmetric) from onnxruntime's MatMulNBitsQuantizer.
- int4 from a GGUF whose linears are Q4_0/Q4_1: the file's blocks go into MatMulNBits as they are
  (Q4_1's d*q + m is MatMulNBits' (q - zp) * scale with scale = d and a *float* zero point zp = -m/d),
  so nothing is rounded twice; tensors the file keeps more precise (the tied Q8_0 embedding) stay fp32.
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
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20}


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
    """Replaces each MatMul whose weight the GGUF stores in Q4_0/Q4_1 by MatMulNBits over those blocks."""
    model = onnx.load(str(src))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    replaced = 0
    for idx, node in enumerate(list(graph.node)):
        # The TorchScript exporter names nodes by module scope: /blocks.3/attn/q_proj/MatMul
        m = re.fullmatch(r"/(blocks\.\d+)/(attn|mlp)/(\w+_proj)/MatMul", node.name)
        if node.op_type != "MatMul" or m is None:
            continue
        weight = f"{m[1]}.{m[2]}.{m[3]}.weight"
        if weight not in packed or node.input[1] not in inits:
            continue
        p = packed[weight]
        b, scales, zero_points = _to_matmul_nbits(p)
        N, K = p.shape
        prefix = weight.removesuffix(".weight")
        new_inits = [
            numpy_helper.from_array(b, f"{prefix}.qweight"),
            numpy_helper.from_array(scales, f"{prefix}.scales"),
            numpy_helper.from_array(zero_points, f"{prefix}.zero_points"),
        ]
        graph.initializer.extend(new_inits)
        graph.node.remove(node)
        graph.node.insert(
            idx,
            helper.make_node(
                "MatMulNBits",
                [node.input[0], *(i.name for i in new_inits)],
                list(node.output),
                name=node.name + "NBits",
                domain="com.microsoft",
                K=K,
                N=N,
                bits=4,
                block_size=BLOCK,
                accuracy_level=accuracy_level,
            ),
        )
        graph.initializer.remove(inits.pop(node.input[1]))
        replaced += 1
    save_model(model, dst)
    return replaced


def _to_matmul_nbits(p: PackedLinear) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GGUF rows of blocks -> MatMulNBits' B (N, K/32, 16) uint8, scales (N*K/32,) and float zero points."""
    N, K = p.shape
    nb = K // BLOCK
    blocks = p.blocks.reshape(N, nb, _BLOCK_BYTES[p.qtype])
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)[..., 0]  # (N, nb)
    if p.qtype == "Q4_1":
        mins = blocks[..., 2:4].copy().view(np.float16).astype(np.float32)[..., 0]
        qs = blocks[..., 4:20]
        safe = np.where(d == 0, 1.0, d)
        zp = np.where(d == 0, -1.0, -mins / safe).astype(np.float32)  # w = d*q + m = (q - (-m/d)) * d
        d = np.where(d == 0, mins, d)  # a constant block (d = 0, q = 0) holds m everywhere: (0 - (-1)) * m
    else:
        qs = blocks[..., 2:18]
        zp = np.full_like(d, 8.0)  # w = d * (q - 8)
    # GGUF: byte j holds q[j] (low nibble) and q[j+16] (high); MatMulNBits: byte i holds q[2i] (low), q[2i+1] (high)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # (N, nb, 32) in element order
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)  # (N, nb, 16)
    return packed, d.reshape(-1), zp.reshape(-1)
