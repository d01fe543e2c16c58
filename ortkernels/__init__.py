"""Custom onnxruntime ops of this project (CPU), one C library:

- `MatMulQ4_1` (ortkernels/q4_1_matmul.c): a GGUF's Q4_1 blocks as they are, read by an int4 bundle's projections;
- `CausalAttention` (ortkernels/attention.c): GroupQueryAttention's contract (packed q/k/v, rotary inside, the shared
  cache buffer) computing only the causal half of a prompt's scores, in fp32 graphs;
- `SwiGLU` (ortkernels/swiglu.c): a gated MLP's silu(gate) * up in place of Split, QuickGelu and Mul, in fp32 graphs;

and one function the service calls through ctypes, not onnxruntime: `SampleRows` (ortkernels/sample.c), the draw of
sampled rows that need every token's probability (`sample_rows`; service/sampler.py keeps its numpy path for where
the library is not built).

The exporter writes an op into a graph only where the library is built (`make setup` builds it with the system C
compiler; nothing else needs one) and lists it in the manifest (`graph.kernels`); the exporter's checks and the
service's engine register the library for such a graph, and the service refuses, in one line, a bundle that needs it
where it is not built. (ortkernels/ort_api.h: the part of onnxruntime's C API they use, without its headers;
ortkernels/register.c: the library's entry points.)
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np

DOMAIN = "gpt_onnx_serve"
LIBRARY = Path(__file__).resolve().parent / "libgpt_onnx_serve_kernels.so"
BUILD_HINT = "build it (again, after a pull) with `make kernels`: a C compiler is all it needs"
VERSION = 4  # the C library's OrtKernelsVersion(): the ops and attributes this code writes and expects


def available() -> bool:
    """Whether the library is built, and built from this version of its source (one built before a pull that
    changed the ops counts as not built: `make` builds it again)."""
    return LIBRARY.is_file() and _version(LIBRARY, LIBRARY.stat().st_mtime_ns) == VERSION


@functools.cache
def _version(library: Path, mtime_ns: int) -> int:
    try:
        return int(ctypes.CDLL(str(library)).OrtKernelsVersion())
    except (OSError, AttributeError):
        return 0


def register(options) -> bool:  # noqa: ANN001  onnxruntime.SessionOptions
    """Registers the library's ops with a session's options, where it is built. -> whether it is."""
    if not available():
        return False
    options.register_custom_ops_library(str(LIBRARY))
    return True


_CODE_PATH = {
    "MatMulQ4_1": "MatMulQ4_1Kernel",
    "CausalAttention": "CausalAttentionKernel",
    "SwiGLU": "CausalAttentionKernel",
}


@functools.cache
def code_path(op: str) -> str:
    """The code an op runs on this CPU: MatMulQ4_1 `avx512vnni`, `avx2` or `generic`; CausalAttention and SwiGLU
    `avx512`, `avx2` or `generic` (GPT_ONNX_SERVE_Q4_1_KERNEL and GPT_ONNX_SERVE_ATTENTION_KERNEL, read once per
    process, override them)."""
    function = getattr(ctypes.CDLL(str(LIBRARY)), _CODE_PATH[op])
    function.restype = ctypes.c_char_p
    return function().decode()


@functools.cache
def _sample_rows_fn():  # noqa: ANN202  the library's SampleRows, or None where it is not built (or built without it)
    if not available():
        return None
    function = getattr(ctypes.CDLL(str(LIBRARY)), "SampleRows", None)
    if function is not None:
        function.restype = ctypes.c_int
        function.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64] + [ctypes.c_void_p] * 4
    return function


def sample_rows(z: np.ndarray, min_p: np.ndarray, top_p: np.ndarray, u: np.ndarray) -> np.ndarray | None:
    """One token per row: z (n, V) float32 C-contiguous, each row a sampled row's logits over its temperature
    (overwritten with its probabilities), min_p, top_p and u (n,) -> (n,) int64 token ids drawn as
    service/sampler.py's numpy path draws them (min-p, the top-p nucleus with its ties, the inverse CDF in vocabulary
    order), their exponentials computed in vectors (so a token may rarely differ where a cut or a draw falls within
    rounding of a boundary). None where the library is not built."""
    function = _sample_rows_fn()
    if function is None:
        return None
    assert z.dtype == np.float32 and z.flags.c_contiguous and z.ndim == 2
    n = len(z)
    min_p = np.ascontiguousarray(min_p, np.float32)
    top_p, u = np.ascontiguousarray(top_p, np.float64), np.ascontiguousarray(u, np.float64)
    tokens = np.zeros(n, np.int64)
    if n and function(
        z.ctypes.data, n, z.shape[1], min_p.ctypes.data, top_p.ctypes.data, u.ctypes.data, tokens.ctypes.data
    ):
        raise MemoryError("SampleRows: no scratch memory")
    return tokens
