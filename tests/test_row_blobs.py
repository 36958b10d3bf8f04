"""Packed row batches (transforms/row_blobs.py): what the cell search sends through Beam."""

import numpy as np
import pytest

from transforms import row_blobs


@pytest.mark.parametrize(
    "payload",
    [
        np.arange(24, dtype=np.float16).reshape(4, 1, 6),
        np.arange(4 * 3 * 32, dtype=np.uint8).reshape(4, 3, 32),  # packed perceptual-hash codes
        np.zeros((0, 1, 8), dtype=np.float16),
    ],
)
def test_round_trip_gives_equal_read_only_views(payload):
    keys = np.array(["a", "bé", "c" * 30, ""][: len(payload)])
    blob = row_blobs.pack(keys, payload)
    assert isinstance(blob, bytes)
    k, p = row_blobs.unpack(blob)
    assert k.dtype == keys.dtype and (k == keys).all() and p.dtype == payload.dtype and np.array_equal(p, payload)
    assert not p.flags.writeable and p.base is not None  # a view into the bytes, not a copy
    cells = np.array([[3, -1], [1, 0], [2, -1], [0, -1]], dtype=np.int32)[: len(payload)]
    k, p, c, groups = row_blobs.unpack(row_blobs.pack(keys, payload, cells, 7))
    assert np.array_equal(c, cells) and c.dtype == np.int32 and groups == 7 and np.array_equal(p, payload)


def test_non_contiguous_arrays_and_tuples():
    x = np.arange(60, dtype=np.float16).reshape(10, 1, 6)[::2]
    keys = np.array([f"k{i}" for i in range(10)])[::2]
    k, p = row_blobs.rows_of(row_blobs.pack(keys, x))
    assert (k == keys).all() and np.array_equal(p, x)
    assert row_blobs.rows_of((keys, x))[1] is x  # a plain tuple (phash code batches) as it is
    with pytest.raises(ValueError):
        row_blobs.unpack(b"not a batch")


@pytest.mark.parametrize("n", [1, 3, 4096])
def test_every_array_view_is_aligned(n):
    """Each array starts at a multiple of ALIGN in the blob (a misaligned float16 view is copied
    element by element: the assignment's row gathers were 7x slower)."""
    keys = np.array([f"k{i:0{1 + i % 7}d}" for i in range(n)])  # odd widths: 4 * width bytes a key
    payload = np.arange(n * 5, dtype=np.float16).reshape(n, 1, 5)
    cells = np.arange(n * 3, dtype=np.int32).reshape(n, 3)
    for blob in (row_blobs.pack(keys, payload, cells, 2), bytearray(row_blobs.pack(keys, payload))):
        views = row_blobs.unpack(blob)
        base = np.frombuffer(blob, np.uint8).ctypes.data
        for v in views[:3] if len(views) > 2 else views:
            assert v.flags.aligned and (v.ctypes.data - base) % row_blobs.ALIGN == 0
        assert (views[0] == keys).all() and np.array_equal(views[1], payload)
    assert np.array_equal(row_blobs.unpack(row_blobs.pack(keys, payload, cells, 2))[2], cells)
