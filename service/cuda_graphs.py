"""Captured CUDA graphs: the engine's decode calls and continuing-prompt chunks replayed, not launched node by node.

On the GPU a decode step is ~300 small kernels whose launches, not arithmetic, set its time. The
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
length (ChunkGraphs): on an H200 a chunk of 32 tokens after 1,000 cached ones takes 1.58 ms replayed against 2.76
ms as ~300 launches. Fresh prompts and longer chunks run plainly. At start the chunk graph is checked against the
plain call like the decode graph (off with one warning if they differ), and the warm-up captures every row's and
length's (2.3 s more at start for 16 rows).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

if TYPE_CHECKING:
    from service.engine import Engine

# Decode batch sizes whose graphs the warm-up captures; larger ones are captured when first seen. Each keeps its own
# (D, V) logits buffer on the device: 27 MB for 1..16 with the default model's vocabulary, 0.4 GB for 1..64.
WARM_GRAPHS = 64
# Continuing-prompt chunk lengths captured on CUDA, a chunk padded to the next one; longer chunks run plainly (their
# arithmetic, not their launches, sets their time). Graph ids: a decode graph's is its D, a chunk graph's from here.
CHUNK_BUCKETS = (16, 32, 64, 128, 256, 512)
CHUNK_GRAPH_IDS = 1 << 20


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


class DecodeGraphs:
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
        """The one-row graph (onnxruntime's warm-up calls, the capture, replays) against the plain call, each making
        the same call in turn, which rewrites the same position of row 0 alike: the first token at position 0 four
        times, then other tokens at positions 1 and 2 (a replay that kept its capture's inputs would differ there).
        Returns the largest logit difference; raises past the bundle's golden bound."""
        e, worst = self.engine, 0.0
        for token, position in ((0, 0), (0, 0), (0, 0), (0, 0), (7, 1), (11, 2)):
            ids, positions = np.array([[token]], np.int64), np.array([[position]], np.int64)  # (1, 1)
            lengths = np.array([position], np.int32)  # (1,) the row's length after this token, minus one
            want = e._forward_plain(ids, positions, lengths, 0, 1, np.arange(1)).copy()  # (1, V)
            worst = max(worst, float(np.abs(self.run(ids, positions, lengths).numpy() - want).max()))
        if not worst <= e.bundle.golden_atol:
            raise RuntimeError(f"the graph's logits differ from the plain call's by {worst:.3g}")
        return worst


class ChunkGraphs:
    """One captured CUDA graph per (cache row, chunk length L in CHUNK_BUCKETS): a continuing prompt's S <= L new
    tokens after a past of P in that row, batch 1, right-padded to L, and the logits of its last real token.
    GroupQueryAttention places a chunk after seqlens_k + 1 - L positions, so seqlens_k is P + L - 1: the padding's
    keys and values land at P + S .. P + L - 1, past the sequence's length, where its next tokens overwrite them, and
    causal attention keeps them out of the real tokens' outputs. Inputs and the logits output are fixed device
    buffers updated in place, as for DecodeGraphs; `total_sequence_length` is the cache length."""

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
        """Chunks after a 2-token prompt in row 0 through the graph (onnxruntime's warm-up calls, the capture,
        replays) against the same chunks run plainly, each rewriting those positions alike: a 3-token chunk four
        times, then a 2-token one after it (other tokens, length and past: a replay that kept its capture's inputs
        would differ). Returns the largest logit difference; raises past the bundle's golden bound."""
        e, worst = self.engine, 0.0
        e._forward_plain(np.array([[1, 2]]), np.arange(2)[None], np.array([1], np.int32), 0, 1, np.array([1]))
        for chunk, past in [(np.array([[3, 4, 5]]), 2)] * 4 + [(np.array([[9, 8]]), 5)]:
            S = chunk.shape[1]
            positions = np.arange(past, past + S)[None]  # (1, S)
            lengths = np.array([past + S - 1], np.int32)
            want = e._forward_plain(chunk, positions, lengths, 0, 1, np.array([S - 1])).copy()  # (1, V)
            worst = max(worst, float(np.abs(self.run(chunk, positions, past, 0) - want).max()))
        if not worst <= e.bundle.golden_atol:
            raise RuntimeError(f"the chunk graph's logits differ from the plain call's by {worst:.3g}")
        return worst
