"""Moving slot contents: what a swap leaves in each slot, with both sides holding positions or one empty."""

from __future__ import annotations

import numpy as np
import pytest

from service.kv_cache import KVCache


@pytest.mark.parametrize(("na", "nb"), [(5, 3), (0, 4), (6, 0)])
def test_a_swap_exchanges_the_valid_positions_and_lengths(na, nb):
    c = KVCache(n_layer=2, slots=3, kv_heads=2, max_len=8, head_dim=4, dtype="float32", device="cpu")
    assert c.arrays is not None and all(np.count_nonzero(a) == 0 for a in c.arrays)
    for i, a in enumerate(c.arrays):
        a[0, :, :na] = 1 + i
        a[2, :, :nb] = 100 + i
    c.lengths[0], c.lengths[2] = na, nb
    c.swap(0, 2)
    assert (c.lengths[0], c.lengths[2]) == (nb, na)
    for i, a in enumerate(c.arrays):
        assert (a[2, :, :na] == 1 + i).all() and (a[0, :, :nb] == 100 + i).all()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_device_copy_graph_zeroes_every_row_of_every_buffer(dtype):
    """What zeroes a CUDA cache at start (fresh device memory holds whatever was there), run on CPU buffers whose
    numpy views show the result: every row, the scratch row too, of every layer's keys and values."""
    c = KVCache(n_layer=2, slots=3, kv_heads=2, max_len=8, head_dim=4, dtype=dtype, device="cpu", device_copies=True)
    assert c.arrays is not None and c._copier is not None
    for a in c.arrays:
        a[:] = np.nan
    c._copier.zero()
    assert all(a.shape[0] == c.slots + 1 and np.count_nonzero(a) == 0 for a in c.arrays)
