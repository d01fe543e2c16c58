"""The onnxruntime session: providers, IO binding, and one call: forward(arrays) -> logits.

The engine sees arrays and cache rows, never requests. Token ids, lengths and the positions whose logits are read
go in from the host; the KV cache stays where it lives (device memory on CUDA) and is updated in place; only the
selected logits come back. On CUDA every node must run on the device: a bundle whose attention cannot (fp32:
onnxruntime's CUDA GroupQueryAttention is fp16/bf16 only) is refused at start with `--device cuda` rather than
served slowly; `--device auto` serves it on the CPU and says so.

CUDA graphs. On the GPU a decode step is ~300 small kernels whose launches, not arithmetic, set its time. The
decode call of D rows (rows [0, D), one token each, every row's logits) is therefore captured once per D as a CUDA
graph (onnxruntime's `enable_cuda_graph`, one `gpu_graph_id` per D) and replayed: its inputs live in fixed device
buffers updated in place, its cache rows are bound once, and `total_sequence_length` is the cache length, a bound
that GroupQueryAttention only checks and sizes its splits by (each row's length comes from `seqlens_k` on the
device). Every other call runs as usual (`gpu_graph_id` -1). At start the one-row graph is checked against the same
call run plainly; if capture fails or they differ, graphs are turned off with one warning, and likewise if a later
capture fails: that call then runs plainly. The start-time warm-up (`warm_up`) captures the graph of every D before
the port opens (up to WARM_GRAPHS rows), so none is captured while streams run. On by default on CUDA
(`--no-cuda-graphs` turns them off): on an H200 they make single-stream decode 2.4x and 16 streams 2.0x faster
(docs/BENCHMARKS.md, GPU). Each D keeps its own (D, V) logits buffer on the device, so their memory grows with the
square of the largest batch seen (27 MB for the default 16 slots).

A continuing prompt (a chunk of new tokens after a past: a prompt whose prefix the prefix cache supplied, or a long
prompt's later chunks) is one call of batch 1 in its own cache row, launch-bound on the GPU as a decode step is. Its
call is captured too, one graph per (cache row, chunk length in CHUNK_BUCKETS), the chunk right-padded to that
length (_ChunkGraphs): on an H200 a chunk of 32 tokens after 1,000 cached ones takes 1.58 ms replayed against 2.76
ms as ~300 launches. Fresh prompts and longer chunks run plainly. At start the chunk graph is checked against the
plain call like the decode graph (off with one warning if they differ), and the warm-up captures every row's and
length's (2.3 s more at start for 16 rows).

Reduced logits. A decode step's logits are V = 49,152 floats a row; the sampler needs few of them for most rows. On
CUDA a decode call asked to (`reduce`) leaves them on the device and returns sampler.Candidates instead: each row's
128 largest logits, its logits at the ids its penalties change, its log-sum-exp and its mass at its temperature,
made by a small graph of the engine's own (_Reducer); the full logits are copied only for a row those do not
settle. On an H200, 16 rows sampled at SmolLM2's defaults: a step 7.1 -> 2.9 ms, 16 streamed chats 1.7-2.5x the
tokens/s (docs/BENCHMARKS.md). Off on the CPU, where the logits are on the host already and numpy is as fast.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import overload

import numpy as np
import onnxruntime as ort

from service.bundle import Bundle, BundleError
from service.kv_cache import MAX_BINDINGS, KVCache
from service.sampler import Candidates

log = logging.getLogger(__name__)

CUDA_ATTENTION_DTYPES = ("float16", "bfloat16")  # onnxruntime's CUDA GroupQueryAttention kernels


def choose_providers(device: str) -> tuple[list[str], str]:
    """(providers for the session, device name for buffers). `auto` takes CUDA when onnxruntime-gpu offers it."""
    available = ort.get_available_providers()
    if device in ("auto", "cuda") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"], "cuda"
    if device == "cuda":
        raise BundleError(f"--device cuda, but onnxruntime offers only {available}")
    return ["CPUExecutionProvider"], "cpu"


# Parallel loops split into shrinking blocks rather than one block per thread: a one-row decode step 3-6% shorter on
# two cores, prefill and 16-row steps unchanged (docs/BENCHMARKS.md, "dynamic block base").
SESSION_CONFIG = {"session.dynamic_block_base": "4"}


def _cuda_only_session(bundle: Bundle, options: ort.SessionOptions, graphs: bool = False) -> ort.InferenceSession:
    """The session on the CUDA provider alone, every node on the device, or one line saying why it cannot be."""
    if bundle.cache_dtype not in CUDA_ATTENTION_DTYPES:
        raise BundleError(
            f"{bundle.path}: its GroupQueryAttention is {bundle.cache_dtype}, which onnxruntime's CUDA provider does "
            f"not run (only {'/'.join(CUDA_ATTENTION_DTYPES)}): export with --dtype fp16, or serve with --device cpu"
        )
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    why = ""
    try:
        cuda = ("CUDAExecutionProvider", {"enable_cuda_graph": "1"} if graphs else {})
        session = ort.InferenceSession(str(bundle.graph), options, providers=[cuda])
        if session.get_providers()[0] == "CUDAExecutionProvider":  # onnxruntime's Python layer may retry on CPU
            return session
    except Exception as exc:
        why = f" ({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})"
    raise BundleError(f"{bundle.graph}: not every node can run on the CUDA provider{why}; serve with --device cpu")


# Decode batch sizes whose graphs the warm-up captures; larger ones are captured when first seen. Each keeps its own
# (D, V) logits buffer on the device: 27 MB for 1..16 with the default model's vocabulary, 0.4 GB for 1..64.
WARM_GRAPHS = 64
# Continuing-prompt chunk lengths captured on CUDA, a chunk padded to the next one; longer chunks run plainly (their
# arithmetic, not their launches, sets their time). Graph ids: a decode graph's is its D, a chunk graph's from here.
CHUNK_BUCKETS = (16, 32, 64, 128, 256, 512)
CHUNK_GRAPH_IDS = 1 << 20


class Engine:
    def __init__(
        self,
        bundle: Bundle,
        slots: int,
        max_len: int,
        device: str = "auto",
        threads: int = 0,
        profile_prefix: str | None = None,  # onnxruntime's profiler on, its trace file named from this
        cuda_graphs: bool = True,  # on CUDA: decode calls replayed from captured graphs
        session_config: dict[str, str] | None = None,  # onnxruntime session config entries over SESSION_CONFIG
        reduce_logits: bool | None = None,  # decode logits reduced to Candidates where computed (None: on CUDA)
    ) -> None:
        self.bundle = bundle
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        for key, value in {**SESSION_CONFIG, **(session_config or {})}.items():
            options.add_session_config_entry(key, value)
        options.log_severity_level = 3
        if profile_prefix is not None:
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        providers, self.device = choose_providers(device)
        if self.device == "cuda":
            ort.set_default_logger_severity(4)  # a machine without CUDA libraries: our one warning below says it
        try:
            self.session = ort.InferenceSession(str(bundle.graph), options, providers=providers)
        except Exception as exc:
            if self.device != "cuda" or device == "cuda":
                raise
            log.warning("CUDA provider failed to start (%s); falling back to CPU", exc)
            providers, self.device = ["CPUExecutionProvider"], "cpu"
            self.session = ort.InferenceSession(str(bundle.graph), options, providers=providers)
        finally:
            ort.set_default_logger_severity(2)
        if self.device == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            if device == "cuda":
                raise BundleError("--device cuda, but onnxruntime-gpu found no usable GPU or CUDA libraries")
            log.warning("onnxruntime-gpu found no usable GPU or CUDA libraries; using the CPU provider")
            self.device = "cpu"
        if self.device == "cuda" and device == "auto" and bundle.cache_dtype not in CUDA_ATTENTION_DTYPES:
            log.warning(
                "%s: %s attention cannot run on onnxruntime's CUDA provider; serving on the CPU "
                "(export with --dtype fp16 for the GPU)",
                bundle.path,
                bundle.cache_dtype,
            )
            self.device = "cpu"
            self.session = ort.InferenceSession(str(bundle.graph), options, providers=["CPUExecutionProvider"])
        graphs = self.device == "cuda" and cuda_graphs
        self._options = options
        if self.device == "cuda":
            del self.session
            self.session = _cuda_only_session(bundle, options, graphs)
        self.providers = self.session.get_providers()
        log.info("onnxruntime %s providers %s (device %s)", ort.__version__, self.providers, self.device)
        on = reduce_logits if reduce_logits is not None else self.device == "cuda"
        self.reducer = _Reducer(self) if on else None
        if self.reducer is not None:
            log.info("decode steps' logits reduced on %s to each row's %d largest", self.device, self.reducer.k)
        self.cache = KVCache(
            bundle.n_layer, slots, bundle.n_kv_head, max_len, bundle.head_dim, bundle.cache_dtype, self.device
        )
        log.info(
            "KV cache: %d slots x %d positions, %.0f MiB on %s", slots, max_len, self.cache.bytes / 2**20, self.device
        )
        self._bindings: dict[tuple[int, int], _RowRange] = {}  # (lo, hi) -> its cache rows bound once
        self.takes_positions = "position_ids" in {i.name for i in self.session.get_inputs()}
        self._plain: ort.RunOptions | None = None  # run options of a call without a graph
        self.graphs: _DecodeGraphs | None = None
        self.chunks: _ChunkGraphs | None = None
        if graphs:
            self._plain = ort.RunOptions()
            self._plain.add_run_config_entry("gpu_graph_id", "-1")
            self.chunks = _ChunkGraphs(self)
            try:
                worst = self.chunks.check()
                log.info("CUDA graphs: continuing prompts replayed (within %.2e of the plain call)", worst)
            except Exception as exc:  # on a fresh session: nothing of a failed capture is left for the decode graphs
                log.warning("CUDA graphs off for continuing prompts: %s", _first_line(exc))
                self.chunks = None
                self._bindings.clear()
                self.session = _cuda_only_session(bundle, options, graphs)
            self.graphs = _DecodeGraphs(self)
            try:
                worst = self.graphs.check()
                log.info("CUDA graphs: decode steps replayed (one-row graph within %.2e of the plain call)", worst)
            except Exception as exc:
                log.warning("CUDA graphs off: %s", _first_line(exc))
                self._without_graphs()

    @overload
    def forward(
        self,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        seqlens_k: np.ndarray,
        lo: int,
        hi: int,
        logits_index: np.ndarray,
        reduce: None = None,
    ) -> np.ndarray: ...

    @overload
    def forward(
        self,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        seqlens_k: np.ndarray,
        lo: int,
        hi: int,
        logits_index: np.ndarray,
        reduce: tuple[np.ndarray, np.ndarray] | None,
    ) -> np.ndarray | Candidates: ...

    def forward(
        self,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        seqlens_k: np.ndarray,
        lo: int,
        hi: int,
        logits_index: np.ndarray,
        reduce: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray | Candidates:
        """One graph call over cache rows [lo, hi).

        input_ids, position_ids (B, S) int64 with B = hi - lo; seqlens_k (B,) int32 = each row's total length
        after this step minus one; logits_index (N,) = the positions whose logits are wanted, as row * S + column.
        Returns logits (N, V) float32 on the host: without a CUDA graph, the row range's own buffer, which its next
        call with N rows overwrites (the scheduler reads a call's logits before it makes the next). (Only
        learned-position graphs read position_ids; rotary ones derive positions from seqlens_k.)

        reduce = (inverse temperatures (N,), edit ids (N, G)) as sampler.reduction_inputs makes them: where the
        engine reduces logits (`self.reducer`) and this is a decode call, Candidates come back instead, the logits
        left where they were computed until a row needs them (until the next call).
        """
        B, S = input_ids.shape
        if self.graphs is not None and lo == 0 and S == 1 and np.array_equal(logits_index, np.arange(B)):
            try:
                return self._reduced(self.graphs.run(input_ids, position_ids, seqlens_k), reduce)
            except Exception as exc:  # a capture that fails while serving (a new batch size): this call runs plainly
                log.warning("CUDA graphs off: a decode call of %d row(s) failed: %s", B, _first_line(exc))
                self._without_graphs()
        if self.chunks is not None and B == 1 and S > 1 and list(logits_index) == [S - 1]:
            past = int(seqlens_k[0]) + 1 - S
            if past > 0 and self.chunks.length(S, past) is not None:  # a continuing prompt's chunk, its last logits
                try:
                    return self.chunks.run(input_ids, position_ids, past, lo)
                except Exception as exc:
                    why = _first_line(exc)
                    log.warning("CUDA graphs off: a continuing prompt's call of %d tokens failed: %s", S, why)
                    self._without_graphs()
        logits = self._forward_plain(input_ids, position_ids, seqlens_k, lo, hi, logits_index)
        return self._reduced(logits, reduce if self.device == "cpu" else None)  # on CUDA: already on the host

    def _reduced(
        self, logits: ort.OrtValue | np.ndarray, reduce: tuple[np.ndarray, np.ndarray] | None
    ) -> np.ndarray | Candidates:
        """A call's logits (N, V), on the host or the device: Candidates when asked for and reduced here, else
        the host array."""
        if isinstance(logits, np.ndarray):
            host: Callable[[], np.ndarray] = lambda: logits  # noqa: E731
        else:  # a copy from the device; on the CPU (tests) a view the next call overwrites
            host = lambda: logits.numpy().copy() if self.device == "cpu" else logits.numpy()  # noqa: E731
        if reduce is None or self.reducer is None:
            return host()
        return self.reducer.run(logits, *reduce, functools.cache(host))  # copied once, if a row needs it

    def _forward_plain(
        self,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        seqlens_k: np.ndarray,
        lo: int,
        hi: int,
        logits_index: np.ndarray,
    ) -> np.ndarray:
        """forward without a CUDA graph, through the row range's binding. -> logits (N, V), the range's buffer"""
        r = self._bindings.get((lo, hi))
        if r is None:  # 2 x n_layer cache bindings per row range, made once: rebinding them cost ~0.3 ms a call
            if len(self._bindings) >= MAX_BINDINGS:
                self._bindings.clear()
            r = self._bindings[lo, hi] = _RowRange(self.session.io_binding(), in_place=self.device == "cpu")
            self.cache.bind(r.binding, lo, hi)
        r.set("input_ids", input_ids, np.int64)  # (B, S)
        if self.takes_positions:
            r.set("position_ids", position_ids, np.int64)  # (B, S)
        r.set("seqlens_k", seqlens_k, np.int32)  # (B,)
        r.set("total_sequence_length", np.array(int(seqlens_k.max()) + 1), np.int32)  # ()
        r.set("logits_index", logits_index, np.int64)  # (N,)
        logits = r.logits(len(logits_index), self.bundle.vocab_size)  # (N, V)
        self.session.run_with_iobinding(r.binding, self._plain)
        return logits

    def _without_graphs(self) -> None:
        """Graphs off for good, on a fresh session: nothing of a failed capture is left to break the plain calls."""
        self.graphs, self.chunks, self._plain = None, None, None
        self._bindings.clear()
        if self.device == "cuda":
            self.session = _cuda_only_session(self.bundle, self._options)

    def warm_up(self, prefill_tokens: int) -> float:
        """On CUDA, the kinds of call serving makes, made once at start, so that no request pays what a kind's first
        call costs there (kernels loaded on first use, memory pools grown, a decode graph captured per batch size):
        prefills of one and of several rows up to `prefill_tokens` tokens, a prompt continuing a cached prefix,
        decode calls over rows [0, D) for every D up to WARM_GRAPHS, and with graphs every row's continuing-chunk
        graph of every length that fits. Every cache row is empty at start, so the keys and values written here sit
        past any sequence's length until real ones overwrite them. Returns seconds."""
        t = time.perf_counter()
        rows, short = self.cache.slots, max(1, min(128, self.cache.max_len // 4))
        long = max(1, min(prefill_tokens, self.cache.max_len // 2))

        def prefill(B: int, S: int, past: int = 0) -> None:  # (B, S) new tokens after `past` cached ones per row
            ids = np.zeros((B, S), np.int64)
            positions = np.tile(np.arange(past, past + S), (B, 1))
            self._forward_plain(ids, positions, np.full(B, past + S - 1, np.int32), 0, B, np.arange(B) * S + S - 1)

        for B, n in {(1, short), (min(rows, max(1, prefill_tokens // short)), short), (1, long)}:
            prefill(B, n)
        prefill(1, short, past=long)  # a continuing prompt: new tokens on a row with a past
        for D in range(1, min(rows, WARM_GRAPHS) + 1):  # a graph is captured after onnxruntime's warm-up runs of D
            reduce = (np.ones(D, np.float32), np.full((D, 1), -1, np.int64))
            for _ in range(3 if self.graphs is not None else 1):
                ids = np.zeros((D, 1), np.int64)
                self.forward(ids, ids, np.zeros(D, np.int32), 0, D, np.arange(D), reduce)
        chunks = self.chunks
        if chunks is not None:  # every row's chunk graphs, each chunk after a past of one token
            for row, L in [(row, L) for row in range(rows) for L in CHUNK_BUCKETS if chunks.length(L, 1) == L]:
                for _ in range(3):
                    chunks.run(np.zeros((1, L), np.int64), np.arange(1, L + 1)[None], 1, row)
        return time.perf_counter() - t

    def check_golden(self) -> float:
        """Prefills the bundle's golden prompts in slot 0; returns the max logit difference. Raises past the bound."""
        expected = self.bundle.golden_logits()  # (P, V)
        worst = 0.0
        for prompt, want in zip(self.bundle.golden_prompts, expected):
            n = len(prompt)
            ids = np.array([prompt], dtype=np.int64)
            last = np.array([n - 1])
            logits = self.forward(ids, np.arange(n)[None], last.astype(np.int32), 0, 1, last)[0]
            worst = max(worst, float(np.abs(logits - want).max()))
        if not worst <= self.bundle.golden_atol:
            raise BundleError(
                f"{self.bundle.path / 'golden.npz'}: this machine's logits differ from the bundle's golden outputs by "
                f"{worst:.3g} (allowed {self.bundle.golden_atol}); refusing to serve (--verify-golden false to skip)"
            )
        return worst


class _RowRange:
    """The IO binding of one row range: its cache rows bound once; the small inputs and the logits buffer stay bound
    while their shapes hold, and on the CPU a call writes the inputs' values into the bound arrays in place. (Binding
    them afresh cost ~0.15 ms a call: right after a graph call has streamed the weights through the caches, the
    binding code runs cold.) onnxruntime copies a host input to the GPU when it is bound, so there each call binds
    its inputs again."""

    def __init__(self, binding: ort.IOBinding, in_place: bool) -> None:
        self.binding, self.in_place = binding, in_place
        self.inputs: dict[str, np.ndarray] = {}  # name -> the host array the binding reads
        self._logits: np.ndarray | None = None  # (N, V) the host array the binding writes

    def set(self, name: str, value: np.ndarray, dtype: type) -> None:
        held = self.inputs.get(name)
        if self.in_place and held is not None and held.shape == value.shape:
            held[...] = value
            return
        held = self.inputs[name] = np.array(value, dtype=dtype)  # its own contiguous memory, kept alive here
        self.binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(held))

    def logits(self, rows: int, vocab: int) -> np.ndarray:
        """The (rows, V) output buffer. (Reading the logits through get_outputs() would wrap every bound output,
        the cache's too: ~0.1 ms a call.)"""
        if self._logits is None or len(self._logits) != rows:
            self._logits = np.empty((rows, vocab), np.float32)
            self.binding.bind_output("logits", "cpu", 0, np.float32, [rows, vocab], self._logits.ctypes.data)
        return self._logits


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


# A captured call: its IO binding, its input buffers by name, its logits buffer on the device, its run options.
_GraphCall = tuple[ort.IOBinding, dict[str, ort.OrtValue], ort.OrtValue, ort.RunOptions]


def _on_device(e: Engine, shape: tuple[int, ...], dtype: type) -> ort.OrtValue:
    return ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, e.device, 0)


def _graph_call(
    e: Engine, inputs: dict[str, ort.OrtValue], total: np.ndarray, lo: int, hi: int, rows: int, graph_id: int
) -> _GraphCall:
    """The fixed buffers of a call replayed from CUDA graph `graph_id`: `inputs` on the device (each call updates
    them in place), a (rows, V) logits output, cache rows [lo, hi) bound once, and `total_sequence_length` on the
    host at the cache length (a bound GroupQueryAttention checks and sizes its work by; each row's own length is in
    seqlens_k)."""
    logits = _on_device(e, (rows, e.bundle.vocab_size), np.float32)  # (rows, V)
    b = e.session.io_binding()
    for name, value in inputs.items():
        b.bind_ortvalue_input(name, value)
    b.bind_cpu_input("total_sequence_length", total)
    b.bind_ortvalue_output("logits", logits)
    e.cache.bind(b, lo, hi)
    options = ort.RunOptions()
    options.add_run_config_entry("gpu_graph_id", str(graph_id))
    return b, inputs, logits, options


class _DecodeGraphs:
    """One captured CUDA graph per decode batch size D: the call over rows [0, D) with one new token each and every
    row's logits. Its inputs and its logits output are fixed device buffers; a step copies the token ids, positions
    and lengths into them and replays the graph (onnxruntime captures it after its own warm-up runs of that D)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.total = np.array(engine.cache.max_len, dtype=np.int32)  # total_sequence_length: the cache length
        self.by_rows: dict[int, _GraphCall] = {}

    def _make(self, D: int) -> _GraphCall:
        e = self.engine
        inputs = {"input_ids": _on_device(e, (D, 1), np.int64), "seqlens_k": _on_device(e, (D,), np.int32)}
        if e.takes_positions:
            inputs["position_ids"] = _on_device(e, (D, 1), np.int64)
        every_row = ort.OrtValue.ortvalue_from_numpy(np.arange(D, dtype=np.int64), e.device, 0)
        return _graph_call(e, {**inputs, "logits_index": every_row}, self.total, 0, D, D, D)

    def run(self, input_ids: np.ndarray, position_ids: np.ndarray, seqlens_k: np.ndarray) -> ort.OrtValue:
        """input_ids, position_ids (D, 1) int64; seqlens_k (D,) int32 -> logits (D, V) float32 on the device, in
        the graph's buffer, which its next replay overwrites."""
        D = len(seqlens_k)
        if D not in self.by_rows:
            self.by_rows[D] = self._make(D)
        b, inputs, logits, options = self.by_rows[D]
        inputs["input_ids"].update_inplace(np.ascontiguousarray(input_ids, dtype=np.int64))
        inputs["seqlens_k"].update_inplace(np.ascontiguousarray(seqlens_k, dtype=np.int32))
        if "position_ids" in inputs:
            inputs["position_ids"].update_inplace(np.ascontiguousarray(position_ids, dtype=np.int64))
        self.engine.session.run_with_iobinding(b, options)
        return logits

    def check(self) -> float:
        """The one-row graph (onnxruntime's warm-up calls, the capture, replays) against the plain call: the first
        token at position 0 of row 0, rewritten alike by each. Returns the largest logit difference; raises past the
        bundle's golden bound."""
        e, ids, zero = self.engine, np.zeros((1, 1), np.int64), np.zeros(1, np.int32)
        want = e._forward_plain(ids, ids, zero, 0, 1, np.arange(1))  # (1, V)
        worst = max(float(np.abs(self.run(ids, ids, zero).numpy() - want).max()) for _ in range(4))
        if not worst <= e.bundle.golden_atol:
            raise RuntimeError(f"the graph's logits differ from the plain call's by {worst:.3g}")
        return worst


class _ChunkGraphs:
    """One captured CUDA graph per (cache row, chunk length L in CHUNK_BUCKETS): a continuing prompt's S <= L new
    tokens after a past of P in that row, batch 1, right-padded to L, and the logits of its last real token.
    GroupQueryAttention places a chunk after seqlens_k + 1 - L positions, so seqlens_k is P + L - 1: the padding's
    keys and values land at P + S .. P + L - 1, past the sequence's length, where its next tokens overwrite them, and
    causal attention keeps them out of the real tokens' outputs. Inputs and the logits output are fixed device
    buffers updated in place, as for _DecodeGraphs; `total_sequence_length` is the cache length."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.total = np.array(engine.cache.max_len, dtype=np.int32)  # total_sequence_length: the cache length
        self.by_key: dict[tuple[int, int], _GraphCall] = {}  # (row, L) -> its call

    def length(self, S: int, past: int) -> int | None:
        """The padded length of a chunk of S tokens after `past` ones, or None when it runs plainly (longer than
        every bucket, or its padding would run past the cache's end)."""
        L = next((L for L in CHUNK_BUCKETS if S <= L), None)
        return L if L is not None and past + L <= self.engine.cache.max_len else None

    def _make(self, row: int, L: int) -> _GraphCall:
        e = self.engine
        inputs = {
            "input_ids": _on_device(e, (1, L), np.int64),
            "seqlens_k": _on_device(e, (1,), np.int32),
            "logits_index": _on_device(e, (1,), np.int64),
        }
        if e.takes_positions:
            inputs["position_ids"] = _on_device(e, (1, L), np.int64)
        graph_id = CHUNK_GRAPH_IDS + row * len(CHUNK_BUCKETS) + CHUNK_BUCKETS.index(L)
        return _graph_call(e, inputs, self.total, row, row + 1, 1, graph_id)

    def run(self, input_ids: np.ndarray, position_ids: np.ndarray, past: int, row: int) -> np.ndarray:
        """input_ids, position_ids (1, S) int64, the chunk after `past` positions of cache row `row` -> the logits
        of its last token (1, V) float32 on the host."""
        S = input_ids.shape[1]
        L = self.length(S, past)
        assert L is not None, "a chunk that fits a bucket"
        if (row, L) not in self.by_key:
            self.by_key[row, L] = self._make(row, L)
        b, inputs, logits, options = self.by_key[row, L]
        ids = np.zeros((1, L), np.int64)  # (1, L) right-padded
        ids[0, :S] = input_ids[0]
        inputs["input_ids"].update_inplace(ids)
        inputs["seqlens_k"].update_inplace(np.array([past + L - 1], np.int32))
        inputs["logits_index"].update_inplace(np.array([S - 1], np.int64))
        if "position_ids" in inputs:
            inputs["position_ids"].update_inplace(np.arange(past, past + L, dtype=np.int64)[None])
        self.engine.session.run_with_iobinding(b, options)
        out = logits.numpy()  # (1, V): a copy from the device; on the CPU (tests) a view the next call overwrites
        return out.copy() if self.engine.device == "cpu" else out

    def check(self) -> float:
        """A 3-token chunk after a 2-token prompt in row 0 through the graph (onnxruntime's warm-up calls, the
        capture, replays) against the same chunk run plainly, each rewriting those positions alike. Returns the
        largest logit difference; raises past the bundle's golden bound."""
        e, first, chunk = self.engine, np.array([[1, 2]]), np.array([[3, 4, 5]])
        e._forward_plain(first, np.arange(2)[None], np.array([1], np.int32), 0, 1, np.array([1]))
        positions = np.arange(2, 5)[None]
        want = e._forward_plain(chunk, positions, np.array([4], np.int32), 0, 1, np.array([2])).copy()  # (1, V)
        worst = max(float(np.abs(self.run(chunk, positions, 2, 0) - want).max()) for _ in range(4))
        if not worst <= e.bundle.golden_atol:
            raise RuntimeError(f"the chunk graph's logits differ from the plain call's by {worst:.3g}")
        return worst


# Candidates (service/sampler.py): the largest logits a decode step returns per row, enough for top-k up to it and
# for the nuclei of the usual temperatures and top-p.
CANDIDATES = 128


class _Reducer:
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
