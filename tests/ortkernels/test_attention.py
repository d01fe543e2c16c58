"""ortkernels/ CausalAttention and SwiGLU in onnxruntime, on each code path this CPU has: CausalAttention against the
torch reference of GroupQueryAttention's contract (export/ops.py, what the exporter's parity check holds the graph
to), SwiGLU against numpy."""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

import ortkernels
from export.ops import packed_gqa_reference
from tests.helpers import needs_kernels

pytestmark = needs_kernels

PATH_FLAGS = {"avx512": {"avx512f", "fma"}, "avx2": {"avx2", "fma"}, "generic": set()}  # what each code path needs


def in_own_process(run, kernel: str):  # noqa: ANN001, ANN201
    """run(kernel) in a process of its own (the library reads GPT_ONNX_SERVE_ATTENTION_KERNEL once, at load); a path
    this CPU cannot run is skipped."""
    flags = set(open("/proc/cpuinfo").read().split()) if os.path.exists("/proc/cpuinfo") else set()
    if not PATH_FLAGS[kernel] <= flags:
        pytest.skip(f"this CPU has no {kernel}")  # an AVX2-only machine runs avx2 and generic
    # a process pool that reports a crashed child (BrokenProcessPool) where multiprocessing.Pool would wait forever
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(run, kernel).result(timeout=600)


ADDRESSING = ("cache_rows", "prefix_rows", "prefix_lens")


def attention_session(
    H: int,
    H_kv: int,
    rotary: bool,
    tables: tuple[str, ...] = ("cos_cache", "sin_cache"),
    addressing: tuple[str, ...] = (),
) -> ort.InferenceSession:
    """One CausalAttention node as export/kernels.py writes it (GroupQueryAttention's inputs less the empty two; no
    shapes declared, so that the op's own checks meet wrong ones); `tables`: the rotary inputs given; `addressing`:
    those of cache_rows, prefix_rows, prefix_lens given."""
    f = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("qkv", f, None),
        helper.make_tensor_value_info("past_key", f, None),
        helper.make_tensor_value_info("past_value", f, None),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, None),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, None),
    ]
    if rotary:
        inputs += [helper.make_tensor_value_info(n, f, None) for n in tables]
    names = [i.name for i in inputs]
    if addressing:
        names += [""] * (7 - len(names))
        for n in ADDRESSING:
            if n in addressing:
                inputs.append(helper.make_tensor_value_info(n, TensorProto.INT32, None))
            names.append(n if n in addressing else "")
    node = helper.make_node(
        "CausalAttention",
        names,
        ["out", "present_key", "present_value"],
        domain=ortkernels.DOMAIN,
        num_heads=H,
        kv_num_heads=H_kv,
    )
    outputs = [helper.make_tensor_value_info(n, f, None) for n in ("out", "present_key", "present_value")]
    graph = helper.make_graph([node], "attention", inputs, outputs)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(ortkernels.DOMAIN, 1)]
    options = ort.SessionOptions()
    assert ortkernels.register(options)
    model = helper.make_model(graph, ir_version=10, opset_imports=opsets)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


# (heads, kv heads, head size, rotary): SmolLM2's 9/3 x 64, multi-head without rotary (GPT-2), 8/2 x 128 (Mistral's
# group of 4), 16 query heads to one kv head (a tile's lanes all one row's), 7/1 (Qwen2-0.5B's group of 7), 6/3 (a
# group of 2). A decode tile takes G's heads 3 (G = 3, 2), 1 (G = 1) or 4 (G = 4, 16, 7) at a time.
MODELS = [
    (9, 3, 64, True), (4, 4, 32, False), (8, 2, 128, True), (16, 1, 16, True), (7, 1, 32, True), (6, 3, 32, True),
]  # fmt: skip
# (rows, new tokens, positions cached before them per row; None: a first prompt, right-padded): a burst of first
# prompts, one long prompt, a continuation after a cached prefix, two at once, decode steps of rows at different
# lengths (one at 0), one row's decode over a long cache (its keys split between threads and merged)
CASES = [(3, 20, None), (1, 130, None), (1, 9, [40]), (2, 33, [5, 60]), (5, 1, [3, 50, 0, 90, 17]), (1, 1, [150])]


def reference(qkv, past_k, past_v, seqlens, total, cos, sin, H, H_kv):  # noqa: ANN001, ANN201
    t = torch.from_numpy
    out, k, v = packed_gqa_reference(
        t(qkv), t(past_k), t(past_v), t(seqlens), torch.tensor(total), *(t(cos), t(sin)) if cos is not None else
        (None, None), H, H_kv,
    )  # fmt: skip
    return out.numpy(), k.numpy(), v.numpy()


# each code path the library has; AVX-512 runs only where the CPU has it (skipped elsewhere: cpu_path)
CODE_PATHS = [pytest.param("avx512", marks=pytest.mark.cpu_path), "avx2", "generic"]


def run_cases(kernel: str) -> tuple[str, float]:
    """In a process of its own (the library reads GPT_ONNX_SERVE_ATTENTION_KERNEL once): -> (the code path run, the
    worst error against the reference, outputs and cache rows written, over every model and case)."""
    os.environ["GPT_ONNX_SERVE_ATTENTION_KERNEL"] = kernel
    rng = np.random.default_rng(0)
    worst = 0.0
    T = 160
    for H, H_kv, D, rotary in MODELS:
        s = attention_session(H, H_kv, rotary)
        angles = rng.uniform(0, 3, (T, D // 2)).astype(np.float32)
        cos, sin = (np.cos(angles), np.sin(angles)) if rotary else (None, None)
        for B, S, past in CASES:
            qkv = rng.standard_normal((B, S, (H + 2 * H_kv) * D)).astype(np.float32)
            past_k, past_v = (rng.standard_normal((B, H_kv, T, D)).astype(np.float32) for _ in range(2))
            if past is None:  # right-padded first prompts: every row S - 1
                seqlens, total = np.full(B, S - 1, np.int32), S
            else:
                seqlens = (np.array(past) + S - 1).astype(np.int32)
                total = int(seqlens.max()) + 1
            feed = {"qkv": qkv, "past_key": past_k, "past_value": past_v, "seqlens_k": seqlens}
            feed["total_sequence_length"] = np.array(total, np.int32)
            if rotary:
                feed.update(cos_cache=cos, sin_cache=sin)
            want = reference(qkv, past_k, past_v, seqlens, total, cos, sin, H, H_kv)
            # one buffer bound as past and present, as the engine binds the cache: written in place
            cache = [ort.OrtValue.ortvalue_from_numpy(x.copy()) for x in (past_k, past_v)]
            binding = s.io_binding()
            binding.bind_output("out")  # first: get_outputs() follows the order of binding
            for name in ("qkv", "seqlens_k", "total_sequence_length") + (("cos_cache", "sin_cache") if rotary else ()):
                binding.bind_cpu_input(name, feed[name])
            for name, value in zip(("key", "value"), cache):
                binding.bind_ortvalue_input(f"past_{name}", value)
                binding.bind_ortvalue_output(f"present_{name}", value)
            s.run_with_iobinding(binding)
            bound = [binding.get_outputs()[0].numpy(), cache[0].numpy(), cache[1].numpy()]
            plain = s.run(None, feed)  # present in buffers of its own: the past copied, then written
            for got in (bound, plain):
                assert got[0].shape == (B, S, H * D) and got[1].shape == past_k.shape
                worst = max(worst, float(np.abs(got[0] - want[0]).max()))
                for r in range(B):  # the cache rows up to each row's length (padding past it is written, unread)
                    n = int(seqlens[r]) + 1
                    for c in (1, 2):
                        worst = max(worst, float(np.abs(got[c][r, :, :n] - want[c][r, :, :n]).max()))
                        assert np.array_equal(got[c][r, :, max(n, S) :], past_k[r, :, max(n, S) :] if c == 1 else
                                              past_v[r, :, max(n, S) :])  # fmt: skip
    return ortkernels.code_path("CausalAttention"), worst


@pytest.mark.parametrize("kernel", CODE_PATHS)
def test_each_code_path_computes_gqa_attention(kernel):
    ran, worst = in_own_process(run_cases, kernel)
    assert ran == kernel
    assert worst < 2e-5  # float32 sums in another order


# (new tokens, per batch row: (cache row, positions cached before its new tokens, prefix row, prefix length)): decode
# steps of rows in scattered cache rows, most sharing one prefix row (more rows than one tile's lanes hold), some
# another, one none, one at its prefix's end; a prefix row that this call writes past the prefix; a continuing prompt
# reading its system prompt from another row, beside one that does not; one row alone sharing a long prefix
SHARED_CASES = [
    (1, [(3, 60, 0, 50), (7, 70, 0, 50), (1, 90, 0, 44), (9, 55, 0, 50), (4, 52, 0, 50), (2, 61, 0, 50),
         (11, 80, 0, 50), (5, 66, 10, 30), (6, 40, 10, 30), (8, 100, 0, 0), (12, 50, 0, 50)]),
    (1, [(0, 50, 0, 0), (2, 64, 0, 50), (3, 51, 0, 50)]),
    (9, [(4, 100, 1, 90), (2, 30, 0, 0)]),
    (1, [(5, 140, 0, 128)]),
]  # fmt: skip


def run_shared_cases(kernel: str) -> tuple[str, float]:
    """In a process of its own: -> (the code path, the worst error) of calls over a cache of more rows than the batch,
    with shared prefixes, against the reference given each row's past with its prefix copied in."""
    os.environ["GPT_ONNX_SERVE_ATTENTION_KERNEL"] = kernel
    rng = np.random.default_rng(2)
    worst, T, N = 0.0, 160, 14
    for H, H_kv, D, rotary in MODELS:
        s = attention_session(H, H_kv, rotary, addressing=ADDRESSING)
        angles = rng.uniform(0, 3, (T, D // 2)).astype(np.float32)
        cos, sin = (np.cos(angles), np.sin(angles)) if rotary else (None, None)
        for S, spec in SHARED_CASES:
            B = len(spec)
            rows, past, prefix_rows, prefix_lens = (np.array(c, np.int32) for c in zip(*spec))
            qkv = rng.standard_normal((B, S, (H + 2 * H_kv) * D)).astype(np.float32)
            cache_k, cache_v = (rng.standard_normal((N, H_kv, T, D)).astype(np.float32) for _ in range(2))
            seqlens = (past + S - 1).astype(np.int32)
            total = int(seqlens.max()) + 1
            # the reference's pasts: each row's own, its prefix from the prefix row as it was before this call
            ref_k, ref_v = cache_k[rows].copy(), cache_v[rows].copy()
            for b in range(B):
                n = prefix_lens[b]
                ref_k[b, :, :n], ref_v[b, :, :n] = cache_k[prefix_rows[b], :, :n], cache_v[prefix_rows[b], :, :n]
            want = reference(qkv, ref_k, ref_v, seqlens, total, cos, sin, H, H_kv)
            feed = {"qkv": qkv, "seqlens_k": seqlens, "total_sequence_length": np.array(total, np.int32)}
            feed |= {"cache_rows": rows, "prefix_rows": prefix_rows, "prefix_lens": prefix_lens}
            if rotary:
                feed.update(cos_cache=cos, sin_cache=sin)
            cache = [ort.OrtValue.ortvalue_from_numpy(x.copy()) for x in (cache_k, cache_v)]
            binding = s.io_binding()
            binding.bind_output("out")
            for name, value in feed.items():
                binding.bind_cpu_input(name, value)
            for name, value in zip(("key", "value"), cache):
                binding.bind_ortvalue_input(f"past_{name}", value)
                binding.bind_ortvalue_output(f"present_{name}", value)
            s.run_with_iobinding(binding)
            out, got_k, got_v = binding.get_outputs()[0].numpy(), cache[0].numpy(), cache[1].numpy()
            worst = max(worst, float(np.abs(out - want[0]).max()))
            for got, before, ref in ((got_k, cache_k, want[1]), (got_v, cache_v, want[2])):
                for b in range(B):  # each row's new positions written into its own cache row, nothing else
                    new = slice(int(past[b]), int(past[b]) + S)
                    worst = max(worst, float(np.abs(got[rows[b], :, new] - ref[b, :, new]).max()))
                    got[rows[b], :, new] = before[rows[b], :, new]
                assert np.array_equal(got, before)
    return ortkernels.code_path("CausalAttention"), worst


@pytest.mark.parametrize("kernel", CODE_PATHS)
def test_each_code_path_reads_cache_rows_and_shared_prefixes(kernel):
    ran, worst = in_own_process(run_shared_cases, kernel)
    assert ran == kernel
    assert worst < 2e-5


def test_bad_cache_rows_and_prefixes_are_clear_errors():
    s = attention_session(4, 2, False, addressing=ADDRESSING)
    feed = {
        "qkv": np.zeros((2, 1, 128), np.float32),
        "past_key": np.zeros((4, 2, 8, 16), np.float32),
        "past_value": np.zeros((4, 2, 8, 16), np.float32),
        "seqlens_k": np.array([3, 5], np.int32),
        "total_sequence_length": np.array(6, np.int32),
        "cache_rows": np.array([1, 3], np.int32),
        "prefix_rows": np.array([0, 1], np.int32),
        "prefix_lens": np.array([3, 3], np.int32),  # row 1 reads row 1's first 3 positions: 3 are written before
    }
    out, _, _ = s.run(None, feed)
    assert out.shape == (2, 1, 64)
    errors = {
        "cache_rows must be distinct rows of the cache": {"cache_rows": np.array([3, 3], np.int32)},
        "cache_rows must be distinct rows": {"cache_rows": np.array([1, 4], np.int32)},
        "prefix_lens must lie within each row's past": {"prefix_lens": np.array([4, 0], np.int32)},
        "prefix_lens must lie within": {"prefix_lens": np.array([-1, 0], np.int32)},
        "prefix_rows must be rows of the cache": {"prefix_rows": np.array([7, 0], np.int32)},
        "a prefix beyond its row's past": {"prefix_lens": np.array([0, 4], np.int32)},
        r"cache_rows, prefix_rows and prefix_lens are int32 \(B,\)": {"prefix_lens": np.array([1], np.int32)},
        r"past_key/past_value must be float \(B, H_kv, T, D\), or \(N >= B": {
            "past_key": np.zeros((1, 2, 8, 16), np.float32), "past_value": np.zeros((1, 2, 8, 16), np.float32)},
    }  # fmt: skip
    for message, change in errors.items():
        with pytest.raises(Exception, match="CausalAttention: " + message):
            s.run(None, {**feed, **change})
    alone = attention_session(4, 2, False, addressing=("prefix_rows",))
    with pytest.raises(Exception, match="CausalAttention: prefix_rows and prefix_lens go together"):
        two = {"past_key": np.zeros((2, 2, 8, 16), np.float32), "past_value": np.zeros((2, 2, 8, 16), np.float32)}
        alone.run(None, {k: v for k, v in {**feed, **two}.items() if k not in ("cache_rows", "prefix_lens")})


def test_bad_lengths_and_shapes_are_clear_errors():
    s = attention_session(4, 2, True)
    feed = {
        "qkv": np.zeros((1, 2, 128), np.float32),
        "past_key": np.zeros((1, 2, 8, 16), np.float32),
        "past_value": np.zeros((1, 2, 8, 16), np.float32),
        "seqlens_k": np.array([8], np.int32),  # a ninth position in a cache of 8
        "total_sequence_length": np.array(9, np.int32),
        "cos_cache": np.ones((8, 8), np.float32),
        "sin_cache": np.zeros((8, 8), np.float32),
    }
    with pytest.raises(Exception, match="CausalAttention: seqlens_k out of range for the cache"):
        s.run(None, feed)
    with pytest.raises(Exception, match="CausalAttention: a position beyond cos_cache/sin_cache"):
        s.run(None, {**feed, "seqlens_k": np.array([7], np.int32), "total_sequence_length": np.array(8, np.int32),
                     "cos_cache": np.ones((6, 8), np.float32), "sin_cache": np.zeros((6, 8), np.float32)})  # fmt: skip
    with pytest.raises(Exception, match="CausalAttention: cos_cache and sin_cache go together"):
        one = attention_session(4, 2, True, tables=("cos_cache",))
        one.run(None, {k: v for k, v in feed.items() if k != "sin_cache"})
    # no new tokens: an empty output, and a present of its own holds the past as it was
    out, k, v = s.run(None, {**feed, "qkv": np.zeros((1, 0, 128), np.float32), "seqlens_k": np.array([3], np.int32),
                             "past_key": np.full((1, 2, 8, 16), 2, np.float32)})  # fmt: skip
    assert out.shape == (1, 0, 64) and (k == 2).all() and (v == 0).all()
    with pytest.raises(Exception, match=r"CausalAttention: qkv must be float \(B, S, \(H \+ 2 H_kv\) D\)"):
        s.run(None, {**feed, "qkv": np.zeros((1, 2, 127), np.float32), "seqlens_k": np.array([3], np.int32)})
    odd = attention_session(2, 2, False)  # a head size not a multiple of 16: the exporter keeps GQA there
    small = {"qkv": np.zeros((1, 2, 48), np.float32), "seqlens_k": np.array([3], np.int32)}
    small |= {"past_key": np.zeros((1, 2, 8, 8), np.float32), "past_value": np.zeros((1, 2, 8, 8), np.float32)}
    with pytest.raises(Exception, match="CausalAttention: the head size must be a multiple of 16"):
        odd.run(None, {**small, "total_sequence_length": np.array(4, np.int32)})


def swiglu_session() -> ort.InferenceSession:
    node = helper.make_node("SwiGLU", ["x"], ["y"], domain=ortkernels.DOMAIN)
    graph = helper.make_graph(
        [node], "swiglu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )  # fmt: skip
    options = ort.SessionOptions()
    assert ortkernels.register(options)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(ortkernels.DOMAIN, 1)]
    model = helper.make_model(graph, ir_version=10, opset_imports=opsets)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_swiglu(kernel: str) -> tuple[str, float]:
    os.environ["GPT_ONNX_SERVE_ATTENTION_KERNEL"] = kernel
    rng = np.random.default_rng(1)
    s = swiglu_session()
    worst = 0.0
    for shape in [(1, 1, 2 * 1536), (3, 5, 2 * 40), (2, 70), (300, 2 * 64), (4, 2)]:  # 40 and 35: not whole vectors
        x = (rng.standard_normal(shape) * 8).astype(np.float32)  # gates from about -30 to 30
        (y,) = s.run(None, {"x": x})
        gate, up = np.split(x.astype(np.float64), 2, axis=-1)
        want = gate / (1 + np.exp(-gate)) * up
        assert y.shape == want.shape and y.dtype == np.float32
        worst = max(worst, float((np.abs(y - want) / (np.abs(want) + 1e-3)).max()))
    with pytest.raises(Exception, match="SwiGLU: X must be float with an even last dimension"):
        s.run(None, {"x": np.zeros((2, 3), np.float32)})
    return ortkernels.code_path("SwiGLU"), worst


@pytest.mark.parametrize("kernel", CODE_PATHS)
def test_swiglu_is_silu_of_the_first_half_times_the_second(kernel):
    ran, worst = in_own_process(run_swiglu, kernel)
    assert ran == kernel
    assert worst < 1e-5  # relative: exp to 1e-7, a division and two products
