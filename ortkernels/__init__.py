"""Custom onnxruntime ops of this project, one C library: `MatMulQ4_1` (ortkernels/q4_1_matmul.c), a GGUF's Q4_1 blocks
as they are, read by an int4 bundle's projections.

The exporter writes the op into a graph only where the library is built (`make setup` builds it with the system C
compiler; nothing else needs one) and lists it in the manifest (`graph.kernels`); the exporter's checks and the
service's engine register the library for such a graph, and the service refuses, in one line, a bundle that needs it
where it is not built.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

DOMAIN = "gpt_onnx_serve"
LIBRARY = Path(__file__).resolve().parent / "libgpt_onnx_serve_kernels.so"
BUILD_HINT = "build it (again, after a pull) with `make kernels`: a C compiler is all it needs"
VERSION = 2  # the C library's OrtKernelsVersion(): the ops and attributes this code writes and expects


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


@functools.cache
def q4_1_kernel() -> str:
    """The MatMulQ4_1 code path this CPU runs: `avx512vnni`, `avx2` or `generic` (GPT_ONNX_SERVE_Q4_1_KERNEL, read
    once per process, overrides it)."""
    lib = ctypes.CDLL(str(LIBRARY))
    lib.MatMulQ4_1Kernel.restype = ctypes.c_char_p
    return lib.MatMulQ4_1Kernel().decode()
