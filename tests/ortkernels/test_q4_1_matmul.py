"""ortkernels/ MatMulQ4_1 in onnxruntime: a GGUF's Q4_1 (and Q4_0) blocks times float activations, on each code path
this CPU has, against the same arithmetic in numpy and against the blocks' exact weights."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import ortkernels
from export.checkpoints import PackedLinear
from export.quantize import BLOCK, _q4_1_projection, q4_1_packed
from tests.export.test_quantize import q4_1_blocks
from tests.helpers import REPO, needs_kernels

pytestmark = needs_kernels

FLAGS = {"avx512vnni": ("avx512f", "avx512bw", "avx512vl", "avx512_vnni"), "avx2": ("avx2", "fma")}


def cpu_has(kernel: str) -> bool:
    flags = set(open("/proc/cpuinfo").read().split()) if os.path.exists("/proc/cpuinfo") else set()
    return set(FLAGS.get(kernel, ())) <= flags


def q4_0_blocks(rng: np.random.Generator, n: int, k: int) -> tuple[PackedLinear, np.ndarray]:
    nb = k // BLOCK
    d = (rng.random((n, nb)) * 0.02).astype(np.float16)
    q = rng.integers(0, 16, (n, nb, 32), dtype=np.uint8)
    raw = np.concatenate([d[..., None].view(np.uint8), q[..., :16] | (q[..., 16:] << 4)], axis=-1)
    w = (q.astype(np.float64) - 8) * d.astype(np.float64)[..., None]
    return PackedLinear("Q4_0", raw.reshape(n, -1), (n, k)), w.reshape(n, k)


def ordinary_q4_1(rng: np.random.Generator, n: int, k: int) -> tuple[PackedLinear, np.ndarray]:
    """Q4_1 rows without q4_1_blocks' awkward first five (a column 60,000 wide would set the scale of a product)."""
    block, w, _ = q4_1_blocks(rng, n + 5, k)
    return PackedLinear("Q4_1", block.blocks[5:], (n, k)), w[5:]


def session(blocks: list[PackedLinear], gated: bool = False) -> ort.InferenceSession:
    """One MatMulQ4_1 node as the exporter writes it (gated: with SwiGLU, over a gate part and an up part)."""
    matmul = helper.make_node("MatMul", ["x", "w"], ["y"], name="/blocks.0/mlp/gate_up_proj/MatMul")
    swiglu = [helper.make_node("Mul", ["g", "u"], ["y"])] if gated else None  # only its output is read
    inits, nodes = _q4_1_projection(matmul, blocks, "p", swiglu)
    graph = helper.make_graph(
        nodes, "q4_1", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits,
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(ortkernels.DOMAIN, 1)]
    options = ort.SessionOptions()
    assert ortkernels.register(options)
    model = helper.make_model(graph, ir_version=10, opset_imports=opsets)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def silu_times(gate_up: np.ndarray) -> np.ndarray:
    gate, up = np.split(gate_up, 2, axis=-1)
    return gate / (1 + np.exp(-gate)) * up


def same_arithmetic(x: np.ndarray, blocks: list[PackedLinear]) -> np.ndarray:
    """The kernel's sums in float64 from its own int8 rounding of x (float32, as the C code rounds): x (M, K)."""
    M, K = x.shape
    nb = K // BLOCK
    xb = x.reshape(M, nb, BLOCK)
    amax = np.abs(xb).max(-1)  # (M, nb)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    aq = np.rint(xb * inv[..., None]).astype(np.float64)  # (M, nb, 32)
    da = (amax / np.float32(127)).astype(np.float64)
    out = []
    for b in blocks:
        raw = b.blocks.reshape(b.shape[0], nb, -1)
        d = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float64)  # (n, nb)
        if b.qtype == "Q4_1":
            m, qs = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64), raw[..., 4:20]
        else:
            m, qs = -8 * d, raw[..., 2:18]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float64)  # (n, nb, 32)
        dot = np.einsum("mbk,nbk->mnb", aq, q)
        out.append((dot * d[None] * da[:, None]).sum(-1) + (m[None] * (da * aq.sum(-1))[:, None]).sum(-1))
    return np.concatenate(out, axis=-1)  # (M, N)


def run_case(kernel: str) -> tuple[str, float, float, float]:
    """In a process of its own (the library reads GPT_ONNX_SERVE_Q4_1_KERNEL once): -> (kernel run, worst error
    against the same arithmetic, worst error against the exact weights, the minimum term's size), over Q4_1 and
    Q4_0 parts side by side (N = 40: not a whole group), inputs of rank 2 and 3, 1 to 17 rows; then gated (SwiGLU)."""
    rng = np.random.default_rng(1)
    parts = [q4_1_blocks(rng, 24, 96), q4_0_blocks(rng, 16, 96)]
    blocks = [p[0] for p in parts]
    weights = np.concatenate([p[1] for p in parts])  # (40, 96)
    s = session(blocks)
    worst_same = worst_exact = minimum = 0.0
    for shape in [(1, 1, 96), (2, 3, 96), (17, 96), (5, 96)]:
        x = (rng.standard_normal(shape) + 0.5).astype(np.float32)
        (y,) = s.run(None, {"x": x})
        assert y.shape == (*shape[:-1], 40) and y.dtype == np.float32
        flat = x.reshape(-1, 96)
        same = same_arithmetic(flat, blocks)
        exact = flat.astype(np.float64) @ weights.T
        scale = np.abs(exact).max()
        worst_same = max(worst_same, float(np.abs(y.reshape(-1, 40) - same).max() / scale))
        worst_exact = max(worst_exact, float(np.abs(y.reshape(-1, 40) - exact).max() / scale))
        minimum = max(minimum, float(np.abs(flat.reshape(-1, 3, 32).sum(-1) @ parts[0][2].T).max() / scale))
    gate, up = ordinary_q4_1(rng, 40, 96), q4_0_blocks(rng, 40, 96)  # SwiGLU over 40 columns: a group and a half
    s = session([gate[0], up[0]], gated=True)
    for shape in [(1, 1, 96), (3, 5, 96)]:
        x = (rng.standard_normal(shape) * 4).astype(np.float32)  # gates from about -10 to 10
        (y,) = s.run(None, {"x": x})
        assert y.shape == (*shape[:-1], 40)
        flat = x.reshape(-1, 96)
        same = silu_times(same_arithmetic(flat, [gate[0], up[0]]))
        exact = silu_times(flat.astype(np.float64) @ np.concatenate([gate[1], up[1]]).T)
        scale = np.abs(exact).max()
        worst_same = max(worst_same, float(np.abs(y.reshape(-1, 40) - same).max() / scale))
        worst_exact = max(worst_exact, float(np.abs(y.reshape(-1, 40) - exact).max() / scale))
    return ortkernels.code_path("MatMulQ4_1"), worst_same, worst_exact, minimum


def in_process_with(kernel: str) -> tuple[str, float, float, float]:
    os.environ["GPT_ONNX_SERVE_Q4_1_KERNEL"] = kernel
    return run_case(kernel)


@pytest.mark.parametrize("kernel", [pytest.param("avx512vnni", marks=pytest.mark.cpu_path), "avx2", "generic"])
def test_each_code_path_computes_the_blocks_product(kernel):
    if not cpu_has(kernel):
        pytest.skip(f"this CPU has no {kernel}")  # an AVX2-only machine runs avx2 and generic
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:  # a crash: an error
        ran, same, exact, minimum = pool.submit(in_process_with, kernel).result(timeout=600)
    assert ran == kernel
    assert same < 1e-5  # the same int8 rounding: only float sums in another order
    assert exact < 1e-2  # int8 activations: llama.cpp's Q4_1 x Q8_1, MatMulNBits' level 4
    assert minimum > 10 * exact  # leaving the minimum term out would fail


# The vector roundings of a row against the scalar one, byte for byte: int8 values, scales and sums. Rows of ordinary
# values, of values landing on halves once scaled (rounded to even either way), of zero blocks, of subnormal and of
# huge products. Compiled against the library's source (its functions are static).
ROUNDING_HARNESS = r"""
#include "q4_1_matmul.c"
#include <stdio.h>
int main(int argc, char** argv) {
  enum { K = 1536, NB = K / 32 };
  QuantizeFn vector = strcmp(argv[1], "avx512vnni") == 0 ? quantize_row_avx512 : quantize_row_avx2;
  static float a[K];
  int8_t q0[K], q1[K];
  float d0[NB], d1[NB], s0[NB], s1[NB];
  unsigned seed = 1;
  long bad = 0;
  for (int it = 0; it < 20000; it++) {
    for (int i = 0; i < K; i++) {
      seed = seed * 1103515245u + 12345u;
      float x = ((int)(seed >> 8) % 20001 - 10000) / 1000.f;
      switch (it % 6) {
        case 1: x = ((int)(seed >> 8) % 255 - 127) * 0.5f; break;
        case 2: x = (seed >> 20) % 3 ? 0.f : x; break;
        case 3: x = i < 64 ? 0.f : x; break;
        case 4: x *= 1e-30f; break;
        case 5: x *= 1e30f; break;
      }
      a[i] = x;
    }
    quantize_row(a, K, q0, d0, s0);
    vector(a, K, q1, d1, s1);
    bad += memcmp(q0, q1, K) || memcmp(d0, d1, sizeof d0) || memcmp(s0, s1, sizeof s0);
  }
  printf("%ld of 20000 rows differ\n", bad);
  return bad != 0;
}
"""


@pytest.mark.parametrize("kernel", [pytest.param("avx512vnni", marks=pytest.mark.cpu_path), "avx2"])
def test_vector_rounding_of_the_rows_is_the_scalar_one(kernel, tmp_path: Path):
    if not cpu_has(kernel):
        pytest.skip(f"this CPU has no {kernel}")
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        pytest.skip("no C compiler to build the harness")
    (tmp_path / "harness.c").write_text(ROUNDING_HARNESS)
    binary = tmp_path / "harness"
    flags = ["-O3", "-fno-math-errno", "-pthread", "-Wno-psabi", "-I", str(REPO / "ortkernels")]
    subprocess.run([cc, *flags, "-o", str(binary), str(tmp_path / "harness.c"), "-lm"], check=True, timeout=120)
    run = subprocess.run([str(binary), kernel], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip() == "0 of 20000 rows differ"


def test_packed_layout_holds_the_files_bytes():
    rng = np.random.default_rng(2)
    block, _, _ = q4_1_blocks(rng, 20, 64)
    packed = q4_1_packed([block])  # (2, 2, 320)
    assert packed.shape == (2, 2, 320) and packed.nbytes == 2 * 16 * 2 * 20  # 20 bytes a block, 12 columns of zeros
    raw = block.blocks.reshape(20, 2, 20)
    col, b = 17, 1  # group 1, column 1
    blk = packed[1, b]
    assert blk[256 + 2 : 258 + 2].tobytes() == raw[col, b, 0:2].tobytes()  # d
    assert blk[288 + 2 : 290 + 2].tobytes() == raw[col, b, 2:4].tobytes()  # m
    digits = np.concatenate([blk[64 * c + 4 : 64 * c + 8] for c in range(4)])  # chunk c, column 1: qs[4c .. 4c+3]
    assert digits.tobytes() == raw[col, b, 4:20].tobytes()
    assert not packed[1, :, 256 + 2 * 4 : 256 + 32].any()  # columns 20-31 of d: zero


def test_a_wrong_input_is_a_clear_error():
    block, _, _ = q4_1_blocks(np.random.default_rng(3), 16, 64)
    s = session([block])
    with pytest.raises(Exception, match="MatMulQ4_1: A must be float with K as its last dimension"):
        s.run(None, {"x": np.zeros((1, 32), np.float32)})
    (y,) = s.run(None, {"x": np.zeros((0, 64), np.float32)})  # no rows: an empty answer
    assert y.shape == (0, 16)


def test_a_library_of_another_version_counts_as_not_built(monkeypatch):
    assert ortkernels.available()
    monkeypatch.setattr(ortkernels, "VERSION", ortkernels.VERSION + 1)  # as a library built before a pull looks
    assert not ortkernels.available()
