"""The KV cache: one preallocated key and value buffer per layer on the device, and the slot bookkeeping.

Each buffer is (slots, H_kv, T_max, D). A forward over rows [lo, hi) binds a view of those rows as both
`past_key_values.{i}.*` and `present.{i}.*`, so GroupQueryAttention writes each row's new positions in place:
a decode step copies nothing but its new keys and values.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

_NP_DTYPES = {"float32": np.float32, "float16": np.float16}


class KVCache:
    def __init__(
        self, n_layer: int, slots: int, kv_heads: int, max_len: int, head_dim: int, dtype: str, device: str
    ) -> None:
        self.n_layer, self.slots, self.max_len = n_layer, slots, max_len
        self.shape = (slots, kv_heads, max_len, head_dim)  # (slots, H_kv, T_max, D)
        self.np_dtype = _NP_DTYPES[dtype]
        self.device = device  # "cpu" | "cuda"
        self.buffers = [
            ort.OrtValue.ortvalue_from_shape_and_type(self.shape, self.np_dtype, device, 0) for _ in range(2 * n_layer)
        ]
        self.row_bytes = int(np.prod(self.shape[1:])) * np.dtype(self.np_dtype).itemsize
        self._free = list(range(slots))  # lowest slot first, so decode ranges stay compact
        self.lengths = np.zeros(slots, dtype=np.int64)  # positions written per slot

    @property
    def bytes(self) -> int:
        return self.row_bytes * self.slots * 2 * self.n_layer

    def allocate(self) -> int | None:
        if not self._free:
            return None
        self._free.sort()
        slot = self._free.pop(0)
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        self.lengths[slot] = 0
        self._free.append(slot)

    @property
    def num_free(self) -> int:
        return len(self._free)

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
