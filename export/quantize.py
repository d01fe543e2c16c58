"""int8 and int4 variants of an fp32 graph, with onnxruntime's own quantizers or a GGUF's own 4-bit blocks.

- int8: dynamic quantization of the MatMul weights (onnxruntime.quantization.quantize_dynamic, per channel).
- int4: weight-only MatMulNBits (block 32, asymmetric) from onnxruntime's MatMulNBitsQuantizer.
- int4 from a GGUF whose linears are Q4_0/Q4_1: the file's blocks go into the graph as they are, so nothing is
  rounded twice (see carry_gguf_blocks): into this project's MatMulQ4_1 (ortkernels/) where it is built, else into
  onnxruntime's MatMulNBits; the tied Q8_0 embedding into an 8-bit MatMulNBits.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from export.checkpoints import PackedLinear
from export.kernels import swiglu_after
from export.model import PACKED
from export.onnx_export import save_model
from ortkernels import DOMAIN as KERNELS_DOMAIN

log = logging.getLogger(__name__)

BLOCK = 32
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 on every MatMul but the MLP down projections; the unembedding (a Gemm) stays fp32.

    Dynamic quantization rounds activations per tensor; the inputs of down_proj carry outliers that this
    destroys (SmolLM2-135M: held-out perplexity 15.59 fp32 -> 25.35 with them quantized, 16.72 without).
    Weights are rounded to 7 bits (`reduce_range`): on x86 without VNNI onnxruntime multiplies u8 activations by s8
    weights with maddubs, whose int16 pair sums saturate with 8-bit weights (a tiny Llama's top-1 agreement fell to
    57% on an AVX2-only Zen 3).

    onnxruntime's dynamic quantizer first turns every plain Gemm into a MatMul, transposing B in place on the
    assumption that nothing else reads it; a tied embedding's Gather does. So the Gemms are hidden from it (alpha
    marked, which it leaves alone) and given back after.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))
    gemms = [n for n in model.graph.node if n.op_type == "Gemm" and _alpha(n) == 1.0]
    for node in gemms:
        _set_alpha(node, _GEMM_HIDDEN)
    keep_fp32 = [n.name for n in model.graph.node if n.op_type == "MatMul" and "/down_proj/" in n.name]
    quantize_dynamic(
        model,
        dst,
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        reduce_range=True,
        weight_type=QuantType.QInt8,
        use_external_data_format=True,
        # DefaultTensorType: shape inference cannot type the contrib ops' outputs (all fp32 here)
        extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
        nodes_to_exclude=keep_fp32,
    )
    quantized = onnx.load(str(dst))
    hidden = {n.name for n in gemms}
    for node in quantized.graph.node:
        if node.name in hidden:
            assert node.op_type == "Gemm" and _alpha(node) == _GEMM_HIDDEN, f"{node.name} was rewritten"
            _set_alpha(node, 1.0)
    save_model(quantized, dst)  # one external-data file with a predictable name


_GEMM_HIDDEN = 2.0  # any alpha but 1: onnxruntime's quantizer leaves such a Gemm as it is


def _alpha(node: onnx.NodeProto) -> float:
    return next((a.f for a in node.attribute if a.name == "alpha"), 1.0)


def _set_alpha(node: onnx.NodeProto, alpha: float) -> None:
    kept = [a for a in node.attribute if a.name != "alpha"]
    del node.attribute[:]
    node.attribute.extend([*kept, helper.make_attribute("alpha", alpha)])


def quantize_int4(src: Path, dst: Path, accuracy_level: int) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=BLOCK, is_symmetric=False, accuracy_level=accuracy_level)
    quantizer.process()
    save_model(quantizer.model.model, dst)


def carry_gguf_blocks(
    src: Path, dst: Path, packed: dict[str, PackedLinear], accuracy_level: int, q4_1_kernel: bool = False
) -> int:
    """Replaces each projection whose weights the GGUF stores in Q4_0/Q4_1 by one node over those blocks.

    With `q4_1_kernel` (the project's kernels built, int8 activations: accuracy level 4) that node is MatMulQ4_1,
    which reads Q4_1's own 20 bytes a block, its minimum term included (_q4_1_projection). Otherwise it is
    onnxruntime's MatMulNBits, as follows.

    A packed projection (q/k/v, gate/up: one MatMul in the graph) takes its parts' blocks side by side along N.
    Q4_0 (w = d·(q − 8)) is MatMulNBits with scale d and zero point 8. Q4_1 (w = d·q + m = d·(q − z) + r) is
    MatMulNBits with scale d and zero point z = −m/d rounded into 0..15, plus the minimum term: sum over blocks of
    the rest r (at most d/2) times the block sum of the input (_to_matmul_nbits). That term rides in the same
    MatMulNBits: the input gains the block means (one AveragePool per projection, shared by its parts) spread over
    a few more positions, and the weights gain the rests (times 32) as exact 4-bit digits (_minimum_digits). (A
    float zero point −m/d would say it all in one node, but onnxruntime's CPU kernel then takes a path 20-40x slower
    than the integer one; a separate fp32 (K/32, N) MatMul of the block means is exact too, but MLAS runs products
    that small on one core: a decode step about 6% slower, docs/BENCHMARKS.md.)

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
        read_by = [node.input[1]]  # initializers the rewrite may leave unread
        if (
            q4_1_kernel
            and accuracy_level >= 4
            and all(b.qtype in ("Q4_0", "Q4_1") for b in blocks)
            and not any(n.op_type == "Gather" and n.input[0] == node.input[1] for n in graph.node)  # not tied
        ):
            swiglu = swiglu_after(node, graph) if len(blocks) == 2 and blocks[0].shape == blocks[1].shape else None
            new_inits, new_nodes = _q4_1_projection(node, blocks, prefix, swiglu)
            for n in swiglu or ():
                graph.node.remove(n)
            read_by += swiglu[0].input[1:] if swiglu else []  # the Split's sizes
        else:
            new_inits, new_nodes = _nbits_projection(node, blocks, prefix, accuracy_level)
        graph.initializer.extend(new_inits)
        idx = list(graph.node).index(node)
        graph.node.remove(node)
        for k, new_node in enumerate(new_nodes):
            graph.node.insert(idx + k, new_node)
        if parts == ["lm_head.weight"]:
            _embed_from_blocks(graph, node.input[1], prefix, blocks[0])
        for name in read_by:
            if not any(name in n.input for n in graph.node):
                graph.initializer.remove(inits.pop(name))
        carried += len(parts)
    if any(n.domain == KERNELS_DOMAIN for n in graph.node):
        model.opset_import.append(helper.make_opsetid(KERNELS_DOMAIN, 1))
    save_model(model, dst)
    return carried


def _q4_1_projection(
    node: onnx.NodeProto, blocks: list[PackedLinear], prefix: str, swiglu: list[onnx.NodeProto] | None = None
) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto]]:
    """One MatMulQ4_1 (ortkernels/q4_1_matmul.c) over the parts' Q4_0/Q4_1 blocks side by side: its packed weights
    are the file's bytes rearranged, 20 a block (a Q4_0 block w = d * (q - 8) is the Q4_1 block of m = -8d, exact
    in fp16). With `swiglu` (the Split, QuickGelu and Mul after a gate/up projection) the node is gated: its groups
    of gate and up columns interleaved, it writes silu(gate) * up, the Mul's output, itself."""
    K = blocks[0].shape[1]
    N = sum(b.shape[0] for b in blocks)
    if swiglu:
        gate, up = q4_1_packed(blocks[:1]), q4_1_packed(blocks[1:])  # (G, K/32, 320) each
        weights = np.stack([gate, up], axis=1).reshape(-1, *gate.shape[1:])  # (2G, K/32, 320): gate 0, up 0, ...
    else:
        weights = q4_1_packed(blocks)
    packed = numpy_helper.from_array(weights, f"{prefix}.q4_1")
    x, y = node.input[0], list(swiglu[-1].output) if swiglu else list(node.output)
    gated = int(bool(swiglu))
    new_node = helper.make_node(
        "MatMulQ4_1", [x, packed.name], y, name=node.name + "Q4_1", domain=KERNELS_DOMAIN, K=K, N=N, gated=gated
    )
    return [packed], [new_node]


def q4_1_packed(blocks: list[PackedLinear]) -> np.ndarray:
    """GGUF rows of Q4_0/Q4_1 blocks (parts side by side along N) -> MatMulQ4_1's weights (ceil(N/16), K/32, 320):
    columns in groups of 16; a group's block is its 16 columns' digits in 4 chunks (chunk c: each column's qs[4c ..
    4c+3]), then their 16 d, then their 16 m (fp16). Columns past N are zero."""
    K = blocks[0].shape[1]
    nb = K // BLOCK
    rows = []
    for b in blocks:
        raw = b.blocks.reshape(b.shape[0], nb, _BLOCK_BYTES[b.qtype])
        if b.qtype == "Q4_0":  # d, qs -> d, m = -8d, qs
            d = raw[..., 0:2].copy().view(np.float16)
            m = (d.astype(np.float32) * -8).astype(np.float16)
            assert np.isfinite(m).all()
            raw = np.concatenate([raw[..., 0:2], m.view(np.uint8), raw[..., 2:18]], axis=-1)
        rows.append(raw)  # (n, nb, 20): d, m, qs[16]
    q41 = np.concatenate(rows)  # (N, nb, 20)
    N = q41.shape[0]
    G = -(-N // 16)
    q41 = np.concatenate([q41, np.zeros((G * 16 - N, nb, 20), np.uint8)]).reshape(G, 16, nb, 20).transpose(0, 2, 1, 3)
    digits = q41[..., 4:20].reshape(G, nb, 16, 4, 4).transpose(0, 1, 3, 2, 4).reshape(G, nb, 256)  # chunk, column
    d, m = q41[..., 0:2].reshape(G, nb, 32), q41[..., 2:4].reshape(G, nb, 32)
    return np.ascontiguousarray(np.concatenate([digits, d, m], axis=-1))  # (G, nb, 320)


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
    """One MatMulNBits over the parts' blocks side by side; a Q4_1 minimum term rides in it (see _minimum_digits)."""
    converted = [_to_matmul_nbits(b) for b in blocks]
    K = blocks[0].shape[1]
    N = sum(b.shape[0] for b in blocks)
    nb = K // BLOCK
    q = np.concatenate([c[0] for c in converted])  # (N, K/32, 32) values, 0..15 (Q4) or 0..255 (Q8_0)
    scales = np.concatenate([c[1] for c in converted])  # (N, K/32)
    zero_points = np.concatenate([c[2] for c in converted])  # (N, K/32)
    bits = 8 if blocks[0].qtype == "Q8_0" else 4
    x, n = node.input[0], node.name
    spread_inits: list[onnx.TensorProto] = []
    new_nodes: list[onnx.NodeProto] = []
    if any(c[3] is not None for c in converted):
        rest = np.concatenate(
            [c[3] if c[3] is not None else np.zeros((bl.shape[0], nb), np.float32) for c, bl in zip(converted, blocks)]
        )  # (N, K/32): what the zero points leave of each block's minimum
        dq, dscales, dzero, spread = _minimum_digits(rest * BLOCK)  # x32: block means in, block sums meant
        q, scales, zero_points = (np.concatenate(t, axis=1) for t in ((q, dq), (scales, dscales), (zero_points, dzero)))
        spread_inits.append(numpy_helper.from_array(spread, f"{prefix}.block_means_spread"))  # (K/32, D*P)
        new_nodes += [  # x (B, S, K) -> block means (B, S, K/32) -> digit inputs (B, S, D*P) -> [x, them] (B, S, K')
            helper.make_node(
                "AveragePool", [x], [f"{n}/block_means"], name=f"{n}/BlockMeans", kernel_shape=[BLOCK], strides=[BLOCK]
            ),
            helper.make_node(
                "MatMul",
                [f"{n}/block_means", f"{prefix}.block_means_spread"],
                [f"{n}/digit_inputs"],
                name=f"{n}/SpreadBlockMeans",
            ),
            helper.make_node(
                "Concat", [x, f"{n}/digit_inputs"], [f"{n}/with_block_means"], name=f"{n}/Concat", axis=-1
            ),
        ]
        x = f"{n}/with_block_means"
    if bits == 4:  # two values a byte, the lower index in the low nibble; zero points likewise, per column
        q = q[..., 0::2] | (q[..., 1::2] << 4)
        if zero_points.shape[1] % 2:
            zero_points = np.pad(zero_points, ((0, 0), (0, 1)))
        zero_points = zero_points[:, 0::2] | (zero_points[:, 1::2] << 4)
    nbits_inits = [
        numpy_helper.from_array(q.astype(np.uint8), f"{prefix}.qweight"),  # (N, K'/32, 32 * bits / 8)
        numpy_helper.from_array(scales.astype(np.float32).reshape(-1), f"{prefix}.scales"),
        numpy_helper.from_array(zero_points.astype(np.uint8).reshape(-1), f"{prefix}.zero_points"),
    ]
    new_nodes.append(
        helper.make_node(
            "MatMulNBits",
            [x, *(i.name for i in nbits_inits)],
            list(node.output),
            name=n + "NBits",
            domain="com.microsoft",
            K=q.shape[1] * BLOCK,
            N=N,
            bits=bits,
            block_size=BLOCK,
            accuracy_level=accuracy_level,
        )
    )
    return nbits_inits + spread_inits, new_nodes


def _minimum_digits(v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Q4_1's minimum-term weights as more 4-bit blocks of the same MatMulNBits, exactly.

    v (N, nb): what multiplies block b's input sum in output column n (float32 values). Each column's values are
    whole multiples of u[n], the largest power of two that divides them all, so v = u * I with integers I, written
    in D base-16 digits I = sum_j 16^j c_j: 0..15 with zero point 0 where a column's values share a sign (u takes
    it), -8..7 with zero point 8 otherwise. Digit j of every block sits in segment j of P = nb rounded up to 32 new
    input positions (the rest zero), and segment j of the input holds 16^j times the block means, so a segment is
    whole blocks with one scale u[n]: the product adds sum_b v[n, b] * mean_b(x). The 16^j are powers of two, so
    with int8 activations (accuracy level 4) every segment rounds the same block means alike.

    -> digits (N, D*P/32, 32), scales (N, D*P/32), zero points (N, D*P/32), and spread (nb, D*P): block means ->
    the segments' inputs (spread[b, j*P + b] = 16^j).
    """
    N, nb = v.shape
    exact = v.astype(np.float64)
    significand, exponent = np.frexp(exact)  # v = s * 2^e, |s| in [0.5, 1): s * 2^53 is a whole number
    whole = np.abs(significand * 2.0**53).astype(np.int64)
    lowest = np.where(whole != 0, exponent - 53 + _trailing_zeros(np.maximum(whole, 1)), np.iinfo(np.int32).max)
    step = lowest.min(axis=1)  # (N,) the exponent of u; an all-zero column: any
    u = np.ldexp(1.0, np.where(step == np.iinfo(np.int32).max, 0, step))
    integers = (exact / u[:, None]).astype(np.int64)  # (N, nb), exact: fp16-derived values span < 2^46 steps
    assert np.array_equal(integers * u[:, None], exact)
    same_sign = np.asarray((integers >= 0).all(axis=1) | (integers <= 0).all(axis=1))  # (N,)
    flip = (integers < 0).any(axis=1) & same_sign
    u, integers = np.where(flip, -u, u), np.where(flip[:, None], -integers, integers)
    zero_point = np.where(same_sign, 0, 8)[:, None]  # (N, 1)
    digits: list[np.ndarray] = []
    rest = integers
    while not digits or rest.any():
        c = np.where(same_sign[:, None], rest % 16, (rest + 8) % 16 - 8)
        digits.append(c + zero_point)
        rest = (rest - c) // 16
    D, P = len(digits), -(-nb // BLOCK) * BLOCK
    q = np.repeat(zero_point, D * P, axis=1)  # (N, D*P): padding digits are 0
    spread = np.zeros((nb, D * P), np.float32)
    for j, c in enumerate(digits):
        q[:, j * P : j * P + nb] = c
        spread[np.arange(nb), j * P + np.arange(nb)] = 16.0**j
    nblocks = D * P // BLOCK
    scales = np.repeat(u[:, None], nblocks, axis=1)  # powers of two within float32's range
    return q.reshape(N, nblocks, BLOCK), scales, np.repeat(zero_point, nblocks, axis=1), spread


def _trailing_zeros(x: np.ndarray) -> np.ndarray:
    """Trailing zero bits of positive int64s."""
    return np.log2((x & -x).astype(np.float64)).astype(np.int64)  # the lowest set bit alone: a power of two


def _to_matmul_nbits(p: PackedLinear) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """GGUF rows of blocks -> MatMulNBits' values (N, K/32, 32), scales (N, K/32) and zero points (N, K/32),
    unpacked, and for Q4_1 what the zero points leave of each block's minimum (N, K/32), for the minimum term.

    A Q4_1 block's minimum m mostly becomes a zero point: z = -m/d rounded (0..15), the rest r = m + d*z is at
    most d/2 (SmolLM2-135M: 3% of |m| on average). The minimum term then carries only r, so rounding the block
    means to int8 (accuracy level 4) costs 30x less than it would with all of m, and MLAS folds the zero points
    in with the int8 block sums of the activations, as llama.cpp's Q4_1 x Q8_1 product does with m."""
    N, K = p.shape
    nb = K // BLOCK
    blocks = p.blocks.reshape(N, nb, _BLOCK_BYTES[p.qtype])
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)[..., 0]  # (N, nb)
    if p.qtype == "Q8_0":  # w = d * q, q int8 -> MatMulNBits 8-bit: (q + 128 - 128) * d
        q8 = (blocks[..., 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)  # (N, nb, 32)
        return q8, d, np.full((N, nb), 128, np.uint8), None
    qs = blocks[..., 4:20] if p.qtype == "Q4_1" else blocks[..., 2:18]
    # GGUF: byte j holds q[j] (low nibble) and q[j+16] (high)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # (N, nb, 32) in element order
    if p.qtype == "Q4_0":  # w = d * (q - 8)
        return q, d, np.full((N, nb), 8, np.uint8), None
    # Q4_1: w = d*q + m = d*(q - z) + r, z the whole number of steps d nearest -m (in 0..15), r = m + d*z the rest
    m = blocks[..., 2:4].copy().view(np.float16).astype(np.float64)[..., 0]  # (N, nb)
    z = np.clip(np.rint(-m / np.where(d > 0, d, 1)), 0, 15) * (d > 0)
    rest = m + d.astype(np.float64) * z  # exact: |rest| <= d/2 or z = 0, a few bits of d's or m's fp16 steps
    assert (rest.astype(np.float32) == rest).all()
    return q, d, z.astype(np.uint8), rest.astype(np.float32)
