"""The KV cache: one preallocated key and value buffer per layer on the device, and the slot bookkeeping.

Each buffer is (slots + 1, H_kv, T_max, D); the last row is scratch for swaps. A forward over rows [lo, hi) binds a
view of those rows as both `past_key_values.{i}.*` and `present.{i}.*`, so GroupQueryAttention writes each row's
new positions in place: a decode step copies nothing but its new keys and values.

A graph on the project's CausalAttention takes the cache bound whole instead (`bind_all`: every row, the scratch
row too) and each batch row's cache row as an input, so that a row can read a prefix from another (a shared
prefix, service/prefix_cache.py).

`lengths[slot]` is the number of positions whose keys and values are valid in that slot, for a running sequence and
for a finished one whose rows the prefix cache keeps alike (a slot that borrows a shared prefix counts those
positions too, though they live in the prefix's row). The scheduler moves a slot's contents to keep the rows
it computes together contiguous (`copy`, `swap`): on the CPU only the valid positions are copied (numpy views of
the buffers); on CUDA whole rows are copied device to device by a small onnxruntime graph of Identity nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

_NP_DTYPES = {"float32": np.float32, "float16": np.float16}
MAX_BINDINGS = 256  # IO bindings kept per cache user (row ranges, copy pairs); past it they are made again


@dataclass(frozen=True)
class CacheRows:
    """Where a call's batch rows live, for a graph that addresses the cache (the engine's `shares_prefixes`): each
    row's slot, and the slot and length of the prefix it borrows (length 0: none)."""

    slots: np.ndarray  # (B,) int32, distinct
    prefix_slots: np.ndarray  # (B,) int32
    prefix_lens: np.ndarray  # (B,) int32: positions [0, len) read from prefix_slots[b]'s row


class KVCache:
    def __init__(
        self,
        n_layer: int,
        slots: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: str,
        device: str,
        device_copies: bool | None = None,
    ) -> None:
        self.n_layer, self.slots, self.max_len = n_layer, slots, max_len
        self.shape = (slots, kv_heads, max_len, head_dim)  # (slots, H_kv, T_max, D) as the graph sees them
        self.np_dtype = _NP_DTYPES[dtype]
        self.device = device  # "cpu" | "cuda"
        rows = (slots + 1, kv_heads, max_len, head_dim)  # + one scratch row
        self.scratch = slots
        if device == "cpu":
            # np.full, not np.zeros: every page is written now, at start, rather than faulted in during a request
            # (a first touch of a slot's rows cost 100+ ms of page faults in a prefill or a slot move)
            self.arrays: list[np.ndarray] | None = [np.full(rows, 0, self.np_dtype) for _ in range(2 * n_layer)]
            self.buffers = [ort.OrtValue.ortvalue_from_numpy(a) for a in self.arrays]  # shares the numpy memory
        else:
            self.arrays = None
            self.buffers = [
                ort.OrtValue.ortvalue_from_shape_and_type(rows, self.np_dtype, device, 0) for _ in range(2 * n_layer)
            ]
        self.row_bytes = int(np.prod(self.shape[1:])) * np.dtype(self.np_dtype).itemsize
        self._copier = _RowCopier(self) if (device_copies if device_copies is not None else device != "cpu") else None
        if device != "cpu" and self._copier is not None:  # zeroed like the CPU's: no row holds NaN or Inf bits
            self._copier.zero()
        self.lengths = np.zeros(slots, dtype=np.int64)  # valid positions per slot

    @property
    def bytes(self) -> int:
        return self.row_bytes * (self.slots + 1) * 2 * self.n_layer

    def usage(self, reserved_positions: int) -> float:
        """Fraction of all cache positions that running sequences have reserved (prompt + max_tokens)."""
        return reserved_positions / (self.slots * self.max_len)

    def bind(self, binding: ort.IOBinding, lo: int, hi: int) -> None:
        """Binds rows [lo, hi) of every layer's buffers as past and present (same memory)."""
        shape = [hi - lo, *self.shape[1:]]
        for i in range(self.n_layer):
            for j, kind in enumerate(("key", "value")):
                buf = self.buffers[2 * i + j]
                ptr = buf.data_ptr() + lo * self.row_bytes
                binding.bind_input(f"past_key_values.{i}.{kind}", self.device, 0, self.np_dtype, shape, ptr)
                binding.bind_output(f"present.{i}.{kind}", self.device, 0, self.np_dtype, shape, ptr)

    def bind_all(self, binding: ort.IOBinding) -> None:
        """Binds every row of every layer's buffers (slots + 1, H_kv, T_max, D) as past and present: a graph that
        takes each batch row's cache row as an input (cache_rows)."""
        shape = [self.slots + 1, *self.shape[1:]]
        for i in range(self.n_layer):
            for j, kind in enumerate(("key", "value")):
                ptr = self.buffers[2 * i + j].data_ptr()
                binding.bind_input(f"past_key_values.{i}.{kind}", self.device, 0, self.np_dtype, shape, ptr)
                binding.bind_output(f"present.{i}.{kind}", self.device, 0, self.np_dtype, shape, ptr)

    # ------------------------------------------------------------------ moving contents between slots

    def copy(self, src: int, dst: int, n: int, start: int = 0) -> None:
        """Positions [start, n) of every layer's keys and values from slot src to slot dst (on CUDA the whole row);
        dst's length becomes n. (A slot borrowing a shared prefix of `start` positions holds nothing of its own
        below them.)"""
        if src != dst and n > start:
            if self._copier is not None:
                self._copier.copy(src, dst)
            else:
                assert self.arrays is not None
                for a in self.arrays:
                    a[dst, :, start:n] = a[src, :, start:n]
        if dst < self.slots:
            self.lengths[dst] = n

    def copy_positions(self, src: int, dst: int, n: int) -> None:
        """Positions [0, n) from slot src to slot dst, the rest of dst and its length as they are (a shared prefix
        given to a slot that borrowed it). On the CPU only: rows are copied whole on the device."""
        assert self.arrays is not None, "positions are copied alone on the CPU only"
        for a in self.arrays:
            a[dst, :, :n] = a[src, :, :n]

    def swap(self, a: int, b: int) -> None:
        """Exchanges the contents (and lengths) of slots a and b, through the scratch row. (Only graphs that bind row
        ranges need slots moved; those read no shared prefixes.)"""
        if a == b:
            return
        na, nb = int(self.lengths[a]), int(self.lengths[b])
        if na == 0 or nb == 0:  # one side holds nothing: one copy, no scratch
            src, dst, n = (b, a, nb) if na == 0 else (a, b, na)
            self.copy(src, dst, n)
            self.lengths[src] = 0
            return
        self.copy(a, self.scratch, na)
        self.copy(b, a, nb)
        self.copy(self.scratch, b, na)


class _RowCopier:
    """Copies one slot's whole row of every buffer to another on the device: a graph of 2 x n_layer Identity nodes
    whose inputs and outputs are bound to the two rows (onnxruntime issues device-to-device copies)."""

    def __init__(self, cache: KVCache) -> None:
        from onnx import TensorProto, helper  # the serving side already depends on onnx for nothing else

        elems = int(np.prod(cache.shape[1:]))
        dtype = TensorProto.FLOAT if cache.np_dtype == np.float32 else TensorProto.FLOAT16
        n = len(cache.buffers)
        graph = helper.make_graph(
            [helper.make_node("Identity", [f"x{i}"], [f"y{i}"]) for i in range(n)],
            "copy_rows",
            [helper.make_tensor_value_info(f"x{i}", dtype, [elems]) for i in range(n)],
            [helper.make_tensor_value_info(f"y{i}", dtype, [elems]) for i in range(n)],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        providers = ["CUDAExecutionProvider"] if cache.device == "cuda" else ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(model.SerializeToString(), providers=providers)
        self.cache, self.elems = cache, elems
        self._bindings: dict[tuple[int, int], ort.IOBinding] = {}  # (src, dst) -> its 2 x n_layer rows, bound once

    def zero(self) -> None:
        """Every row of every buffer set to zeros, copied from one zeroed row on the device (fresh device memory holds
        whatever was there; a host array of zeros the size of a buffer is not needed)."""
        c = self.cache
        zero = ort.OrtValue.ortvalue_from_numpy(np.zeros(self.elems, c.np_dtype), c.device, 0)  # (H_kv*T_max*D,)
        for row in range(c.slots + 1):
            b = self.session.io_binding()
            for i, buf in enumerate(c.buffers):
                b.bind_input(f"x{i}", c.device, 0, c.np_dtype, [self.elems], zero.data_ptr())
                b.bind_output(f"y{i}", c.device, 0, c.np_dtype, [self.elems], buf.data_ptr() + row * c.row_bytes)
            self.session.run_with_iobinding(b)

    def copy(self, src: int, dst: int) -> None:
        c, b = self.cache, self._bindings.get((src, dst))
        if b is None:
            if len(self._bindings) >= MAX_BINDINGS:
                self._bindings.clear()
            b = self._bindings[src, dst] = self.session.io_binding()
            for i, buf in enumerate(c.buffers):
                base = buf.data_ptr()
                b.bind_input(f"x{i}", c.device, 0, c.np_dtype, [self.elems], base + src * c.row_bytes)
                b.bind_output(f"y{i}", c.device, 0, c.np_dtype, [self.elems], base + dst * c.row_bytes)
        self.session.run_with_iobinding(b)
