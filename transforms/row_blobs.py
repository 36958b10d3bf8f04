"""Arrays of rows as one ``bytes`` element: how the cell search's batches cross stages and shuffles.

A batch (keys, payload[, cells, groups]) is packed into one bytes object: a small header, then
the arrays' raw buffers, each at an offset that is a multiple of ``ALIGN`` (a bytes object's data
is 16-byte aligned, so the views are aligned: numpy copies rows out of a misaligned float16 view
element by element; at 1M x 512 the assignment's row gathers took 2.8 CPU-s misaligned, 0.25
aligned). Beam encodes ``bytes`` as a length and the bytes (no pickling of numpy arrays: one copy
in, one copy out), and ``unpack`` returns read-only numpy views into the bytes (no copy). On the
in-process runner a shuffle's values are decoded, held, encoded and decoded again: each pickled
array cost a copy more at every step. ``rows_of`` also takes a ``transforms.spill.SpillRef`` (the
same bytes in a file; only the reference travels).
"""

from __future__ import annotations

import json
import struct

import numpy as np

MAGIC = b"MSRB2"
_LEN = struct.Struct("<I")
ALIGN = 64


def _padded(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def pack(keys: np.ndarray, payload: np.ndarray, cells: np.ndarray | None = None, groups: int = 0) -> bytes:
    """(keys, payload[, cells, groups]) -> bytes. ``keys``: a numpy string array (fixed width)."""
    return b"".join(pieces(keys, payload, cells, groups))


def pieces(keys: np.ndarray, payload: np.ndarray, cells: np.ndarray | None = None, groups: int = 0) -> list:
    """``pack``'s bytes as buffers (header, then each array's memory), for writing without a join."""
    arrays = [np.ascontiguousarray(keys), np.ascontiguousarray(payload)]
    if cells is not None:
        arrays.append(np.ascontiguousarray(cells))
    meta = [[a.dtype.str, list(a.shape)] for a in arrays]
    head = json.dumps({"a": meta, "g": groups}).encode()
    start = len(MAGIC) + _LEN.size
    head += b" " * (_padded(start + len(head)) - start - len(head))  # the first array at ALIGN
    out = [MAGIC, _LEN.pack(len(head)), head]
    for i, a in enumerate(arrays):
        out.append(memoryview(a.reshape(-1).view(np.uint8)))
        if i + 1 < len(arrays) and a.nbytes % ALIGN:
            out.append(bytes(_padded(a.nbytes) - a.nbytes))  # the next array at ALIGN
    return out


def unpack(blob: bytes) -> tuple:
    """bytes from ``pack`` -> (keys, payload) or (keys, payload, cells, groups), views (read-only
    of bytes, writable of a bytearray)."""
    if bytes(blob[: len(MAGIC)]) != MAGIC:
        raise ValueError("not a packed row batch")
    start = len(MAGIC) + _LEN.size
    (size,) = _LEN.unpack_from(blob, len(MAGIC))
    head = json.loads(blob[start : start + size])
    pos, out = start + size, []
    for dtype, shape in head["a"]:
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        out.append(np.frombuffer(blob, dtype=dt, count=count, offset=pos).reshape(shape))
        pos += _padded(count * dt.itemsize)
    return tuple(out) if len(out) == 2 else (*out, head["g"])


def rows_of(batch) -> tuple:
    """A batch as the cell search receives it: packed bytes, a (keys, payload, ...) tuple, a
    ``transforms.spill.SpillRef`` to packed bytes in a file or a ``transforms.spill.InputRows``
    (rows of an input file; read here)."""
    if isinstance(batch, bytes | bytearray):
        return unpack(batch)
    if isinstance(batch, tuple | list):
        return tuple(batch)
    from transforms import spill

    if isinstance(batch, spill.InputRows):
        return spill.read_input(batch)
    return unpack(spill.read(batch))


def gathered(parts: list) -> np.ndarray:
    """Held payloads (an array, or (a batch's payload, row indices) to take) -> one array: the
    rows are taken straight into it (one copy, not a gather and then a concatenation)."""
    sizes = [len(p[1]) if isinstance(p, tuple) else len(p) for p in parts]
    first = parts[0][0] if isinstance(parts[0], tuple) else parts[0]
    out = np.empty((sum(sizes), *first.shape[1:]), dtype=first.dtype)
    pos = 0
    for p, size in zip(parts, sizes, strict=True):
        if isinstance(p, tuple):
            np.take(p[0], p[1], axis=0, out=out[pos : pos + size])
        else:
            out[pos : pos + size] = p
        pos += size
    return out
