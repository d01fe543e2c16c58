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
from export.model import PACKED
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
        # DefaultTensorType: shape inference cannot type the contrib ops' outputs (all fp32 here)
        extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
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
    """Replaces each projection whose weights the GGUF stores in Q4_0/Q4_1 by MatMulNBits over those blocks.

    A packed projection (q/k/v, gate/up: one MatMul in the graph) takes its parts' blocks side by side along N.
    Q4_0 (w = d·(q − 8)) is MatMulNBits with scale d and zero point 8. Q4_1 (w = d·q + m) is split in two exact
    terms: MatMulNBits with scale d and zero point 0, plus the per-block minimums times the block sums of the input.
    The block sums are computed once per projection, shared by all its parts, as one AveragePool (kernel and stride
    32 over the last axis: the block means) times minimums pre-multiplied by 32 (a power of two: exact), then a small
    (…, K/32) @ (K/32, N) MatMul added to the MatMulNBits output. (A float zero point −m/d would express it in one
    node, but onnxruntime's CPU kernel then takes a path 20-40x slower than the integer one.)

    The unembedding, when the file stores it in Q8_0, becomes an 8-bit MatMulNBits (q + 128, zero point 128), but
    only with int8 activations (accuracy level 4): onnxruntime's 8-bit kernel is 100x slower in fp32 compute, so at
    lower levels it stays fp32. Either way nothing is rounded below the file's own precision. Returns the number of
    GGUF tensors carried.
    """
    model = onnx.load(str(src))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    carried = 0
    for node in list(graph.node):
        parts = _gguf_parts(node, graph, accuracy_level)
        if not parts or node.input[1] not in inits or any(p not in packed for p in parts):
            continue
        blocks = [packed[p] for p in parts]
        if len({b.qtype for b in blocks}) > 1 and any(b.qtype == "Q8_0" for b in blocks):
            continue
        prefix = parts[0].removesuffix(".weight") if len(parts) == 1 else node.name.strip("/").replace("/", ".")
        new_inits, new_nodes = _nbits_projection(node, blocks, prefix, accuracy_level)
        graph.initializer.extend(new_inits)
        idx = list(graph.node).index(node)
        graph.node.remove(node)
        for k, new_node in enumerate(new_nodes):
            graph.node.insert(idx + k, new_node)
        if parts == ["lm_head.weight"]:
            _embed_from_blocks(graph, node.input[1], prefix, blocks[0])
        if not any(node.input[1] in n.input for n in graph.node):
            graph.initializer.remove(inits.pop(node.input[1]))
        carried += len(parts)
    save_model(model, dst)
    return carried


def _embed_from_blocks(graph: onnx.GraphProto, table: str, prefix: str, block: PackedLinear) -> None:
    """A tied embedding whose unembedding became an 8-bit MatMulNBits: its Gather reads the same Q8_0 blocks
    (GatherBlockQuantized, exact: (q - 128) * d is the table's own dequantization), so the table is stored once."""
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] == table]
    if not gathers:
        return
    N, K = block.shape
    shapes = {"qweight": (N, K), "scales": (N, K // BLOCK), "zero_points": (N, K // BLOCK)}
    for name, shape in shapes.items():
        graph.initializer.append(numpy_helper.from_array(np.array(shape, np.int64), f"{prefix}.{name}_2d_shape"))
    for gather in gathers:
        i = list(graph.node).index(gather)
        graph.node.remove(gather)
        new_nodes = [
            helper.make_node(
                "Reshape",
                [f"{prefix}.{name}", f"{prefix}.{name}_2d_shape"],
                [f"{prefix}.{name}_2d"],
                name=f"{gather.name}/{name}",
            )
            for name in shapes
        ]
        new_nodes.append(
            helper.make_node(
                "GatherBlockQuantized",
                [f"{prefix}.qweight_2d", gather.input[1], f"{prefix}.scales_2d", f"{prefix}.zero_points_2d"],
                list(gather.output),
                name=gather.name + "BlockQuantized",
                domain="com.microsoft",
                bits=8,
                block_size=BLOCK,
                gather_axis=0,
                quantize_axis=1,
            )
        )
        for k, new_node in enumerate(new_nodes):
            graph.node.insert(i + k, new_node)


def _gguf_parts(node: onnx.NodeProto, graph: onnx.GraphProto, accuracy_level: int) -> list[str]:
    """The checkpoint weights behind a projection node, in output order; [] for nodes that are not one."""
    if node.op_type == "Gemm" and node.output[0] == "logits":  # the unembedding, x @ W^T
        return ["lm_head.weight"] if accuracy_level >= 4 else []
    # The TorchScript exporter names nodes by module scope: /blocks.3/attn/qkv_proj/MatMul, .../mlp/down_proj/MatMul
    m = re.fullmatch(r"/(blocks\.\d+)/(attn|mlp)/(\w+_proj)/MatMul", node.name)
    if node.op_type != "MatMul" or m is None:
        return []
    names = PACKED.get(m[3], (m[3],))
    return [f"{m[1]}.{m[2]}.{name}.weight" for name in names]


def _nbits_projection(
    node: onnx.NodeProto, blocks: list[PackedLinear], prefix: str, accuracy_level: int
) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto]]:
    """MatMulNBits over the parts' blocks side by side, plus the Q4_1 minimum term when any part has one."""
    converted = [_to_matmul_nbits(b) for b in blocks]
    K = blocks[0].shape[1]
    N = sum(b.shape[0] for b in blocks)
    nb = K // BLOCK
    b = np.concatenate([c[0] for c in converted])  # (N, K/32, 16 or 32)
    scales = np.concatenate([c[1] for c in converted])
    zero_points = np.concatenate([c[2] for c in converted])
    has_mins = any(c[3] is not None for c in converted)
    bits = 8 if blocks[0].qtype == "Q8_0" else 4
    new_inits = [
        numpy_helper.from_array(b, f"{prefix}.qweight"),
        numpy_helper.from_array(scales, f"{prefix}.scales"),
        numpy_helper.from_array(zero_points, f"{prefix}.zero_points"),
    ]
    x, y, n = node.input[0], node.output[0], node.name
    nbits_out = f"{n}/nbits_out" if has_mins else y
    new_nodes = [
        helper.make_node(
            "MatMulNBits",
            [x, *(i.name for i in new_inits)],
            [nbits_out],
            name=n + "NBits",
            domain="com.microsoft",
            K=K,
            N=N,
            bits=bits,
            block_size=BLOCK,
            accuracy_level=accuracy_level,
        )
    ]
    if has_mins:  # + blocksum(x) @ mins^T = blockmean(x) @ (32 mins)^T: x (B, S, K) -> (B, S, K/32) -> (B, S, N)
        mins = np.concatenate(
            [c[3] if c[3] is not None else np.zeros((bl.shape[0], nb), np.float32) for c, bl in zip(converted, blocks)]
        )
        new_inits.append(
            numpy_helper.from_array(np.ascontiguousarray((mins * BLOCK).T), f"{prefix}.mins_t")
        )  # (K/32, N)
        new_nodes += [
            helper.make_node(
                "AveragePool", [x], [f"{n}/block_means"], name=f"{n}/BlockMeans", kernel_shape=[BLOCK], strides=[BLOCK]
            ),
            helper.make_node(
                "MatMul", [f"{n}/block_means", f"{prefix}.mins_t"], [f"{n}/min_term"], name=f"{n}/MinsMatMul"
            ),
            helper.make_node("Add", [nbits_out, f"{n}/min_term"], [y], name=f"{n}/Add"),
        ]
    return new_inits, new_nodes


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
