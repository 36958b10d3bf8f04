"""The first outputs of many ``random.Random(str)`` generators at once, in numpy.

``random.Random(s)`` for a ``str`` (CPython 3.9+, seed version 2) turns ``s`` into the integer of
``s.encode() + sha512(s.encode()).digest()`` (big-endian), splits it into 32-bit words from the
least significant end and seeds MT19937 with ``init_by_array`` of those words (``_randommodule.c``,
the reference ``mt19937ar.c``). Its ``getrandbits(k)`` for ``k <= 32`` is the next tempered output
shifted right by ``32 - k``; ``_randbelow(n)`` draws ``getrandbits(n.bit_length())`` until the
value is below ``n``. ``streams`` runs ``init_by_array`` for a batch of seeds in lock step (one
numpy operation per step over the batch, so each seed costs a fraction of CPython's scalar loop) and
gives each generator's first ``K`` outputs; ``Draws`` replays ``_randbelow`` on them, and says
which generators ran out (the caller redraws those with ``random.Random`` itself).
``joined_streams`` does the same for seeds ``prefix + s + suffix`` over an Arrow string column:
the seeds' bytes, their digests' and the key words are built as arrays (no string per seed).

Nothing here is random: the same seeds give the same numbers as ``random.Random`` does, which
``tests/test_diversify_columns.py`` checks against CPython's own generator.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from operator import itemgetter

import numpy as np

try:  # CPython's own SHA-512 (the same digests as OpenSSL's; a little cheaper per short message)
    from _sha512 import sha512 as _sha512
except ImportError:  # pragma: no cover - a build without it
    from hashlib import sha512 as _sha512

_HASH_DIGEST = type(_sha512()).digest
_first = itemgetter(0)

N, M = 624, 397
MAX_OUTPUTS = N - M  # outputs computable from the seeded state before its second half is twisted
_BATCH = 32768  # generators seeded together (a few vectors of this length stay in cache)


def _init_genrand() -> np.ndarray:
    mt = np.empty(N, dtype=np.uint64)
    mt[0] = 19650218
    for i in range(1, N):
        prev = int(mt[i - 1])
        mt[i] = (1812433253 * (prev ^ (prev >> 30)) + i) & 0xFFFFFFFF
    return mt.astype(np.uint32)


_INIT = _init_genrand()


def seed_keys(seeds: list[str]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Seed strings -> (their positions, (key length, n) uint32 keys) per key length: the words
    ``random.Random(seed)`` gives ``init_by_array``, the integer of the seed's bytes and their
    SHA-512 digest cut into 32-bit words from its least significant end."""
    encoded = [s.encode() for s in seeds]
    if not encoded:
        return
    lowest = min(encoded)
    plain = np.ones(len(encoded), dtype=bool)
    if not lowest or lowest[0] == 0:  # leading zero bytes shorten the integer: those key by key
        odd = [i for i, b in enumerate(encoded) if not b or b[0] == 0]
        plain[odd] = False
        keys = [_key_of(encoded[i]) for i in odd]
        lengths = np.array([len(k) for k in keys])
        for length in np.unique(lengths).tolist():
            at = np.flatnonzero(lengths == length)
            yield np.array(odd)[at], np.stack([keys[i] for i in at.tolist()], axis=1)
    sizes = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    sizes[~plain] = -1
    for size in np.unique(sizes[plain]).tolist():
        rows = np.flatnonzero(sizes == size)
        seeded = encoded if len(rows) == len(encoded) else [encoded[i] for i in rows.tolist()]
        digests = b"".join(_digests(seeded))
        padded = np.zeros((len(rows), -(-(size + 64) // 4) * 4), dtype=np.uint8)  # reversed: seed, digest
        padded[:, :64] = np.frombuffer(digests, dtype=np.uint8).reshape(len(rows), 64)[:, ::-1]
        padded[:, 64 : size + 64] = np.frombuffer(b"".join(seeded), dtype=np.uint8).reshape(len(rows), size)[:, ::-1]
        yield rows, np.ascontiguousarray(padded.view("<u4").T)


def utf8_buffers(values) -> tuple[np.ndarray, np.ndarray]:
    """An Arrow string array without nulls -> (int64 offsets, uint8 data): each value's UTF-8
    bytes (``str.encode()``'s) are ``data[offsets[i]:offsets[i + 1]]`` (the array's own buffers)."""
    import pyarrow as pa

    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        values = values.cast(pa.large_string())
    _, offsets, data = values.buffers()
    width = np.int64 if pa.types.is_large_string(values.type) else np.int32
    offsets = np.frombuffer(offsets, dtype=width)[values.offset : values.offset + len(values) + 1].astype(np.int64)
    data = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
    return offsets, data


def joined_keys(prefix: bytes, offsets: np.ndarray, data: np.ndarray, suffix: bytes, batch: int = 1 << 62):
    """``seed_keys`` of the seeds ``prefix + middle + suffix`` (middle i: ``data[offsets[i]:
    offsets[i + 1]]``), in batches of at most ``batch`` seeds, built from the bytes at once (no
    string per seed): (positions, (key length, n) keys). ``prefix`` must not start with a zero byte."""
    if not prefix or prefix[0] == 0:
        raise ValueError("prefix must be non-empty and start with a non-zero byte")
    lengths = np.diff(offsets)
    head, tail = np.frombuffer(prefix, np.uint8), np.frombuffer(suffix, np.uint8)
    for length in np.unique(lengths).tolist():
        same = np.flatnonzero(lengths == length)
        size = len(prefix) + length + len(suffix)  # the seed's bytes; the integer adds the digest's 64
        width = -(-(size + 64) // 4) * 4
        pad = width - size - 64  # zero bytes before the most significant one: the integer is unchanged
        middle = np.arange(length)
        for start in range(0, len(same), batch):
            rows = same[start : start + batch]
            seeds = np.empty((len(rows), size), dtype=np.uint8)
            seeds[:, : len(prefix)] = head
            seeds[:, len(prefix) : len(prefix) + length] = data[offsets[rows][:, None] + middle]
            seeds[:, len(prefix) + length :] = tail
            buf = np.zeros((len(rows), width), dtype=np.uint8)
            buf[:, pad : pad + size] = seeds
            digests = _digests_of(seeds.tobytes(), size)
            buf[:, pad + size :] = np.frombuffer(digests, dtype=np.uint8).reshape(len(rows), 64)
            # big-endian words, most significant first -> init_by_array's words, least significant first
            yield rows, np.ascontiguousarray(buf.view(">u4")[:, ::-1].T, dtype=np.uint32)


def joined_streams(prefix: str, middle, suffix: str, k: int) -> np.ndarray:
    """``streams`` of the seeds ``prefix + m + suffix`` for each string ``m`` of ``middle`` (an
    Arrow string array): the same outputs, the seeds' bytes built as arrays."""
    if not 0 < k <= MAX_OUTPUTS:
        raise ValueError(f"k must be in 1..{MAX_OUTPUTS}")
    head, tail = prefix.encode(), suffix.encode()
    if middle.null_count or not head or head[0] == 0:
        return streams([f"{prefix}{m}{suffix}" for m in middle.to_pylist()], k)
    offsets, data = utf8_buffers(middle)
    out = np.empty((k, len(offsets) - 1), dtype=np.uint32)

    def fill(rows: np.ndarray, key: np.ndarray) -> None:
        out[:, rows] = _outputs(_seeded(key, k), k)

    batches = joined_keys(head, offsets, data, tail, _BATCH)
    if len(offsets) - 1 <= _BATCH:
        for rows, key in batches:
            fill(rows, key)
        return out
    # several batches: the seeding (numpy over a batch: the GIL is released inside each operation)
    # runs on helper threads while this one hashes the next batch's seeds (SHA-512 holds the GIL)
    pool, pending = _seeding_pool(), []
    for rows, key in batches:
        pending.append(pool.submit(fill, rows, key))
        while len(pending) > SEEDING_THREADS + 1:  # bounded: a few batches' keys alive at once
            pending.pop(0).result()
    for f in pending:
        f.result()
    return out


SEEDING_THREADS = 2


def _seeding_pool():
    """The process's seeding threads (``transforms.threads``: created once, idle between uses)."""
    from transforms.threads import pool

    return pool("mt-seeding", SEEDING_THREADS)


def _digests(seeds) -> list[bytes]:
    """SHA-512 of each (copies of one empty context: cheaper than a new one each)."""
    empty, out = _sha512(), []
    for b in seeds:
        h = empty.copy()
        h.update(b)
        out.append(h.digest())
    return out


def _digests_of(flat: bytes, size: int) -> bytes:
    """The SHA-512 digests of ``flat``'s consecutive ``size``-byte pieces, concatenated (C-level
    iteration: no Python frame per piece)."""
    pieces = map(_first, struct.iter_unpack(f"{size}s", flat))
    return b"".join(map(_HASH_DIGEST, map(_sha512, pieces)))


def _key_of(b: bytes) -> np.ndarray:
    b = (b + _sha512(b).digest()).lstrip(b"\0")[::-1]  # little-endian bytes of the integer
    return np.frombuffer(b + b"\0" * (-len(b) % 4) if b else b"\0\0\0\0", dtype="<u4")


def streams(seeds: list[str], k: int) -> np.ndarray:
    """(k, len(seeds)) uint32: the first ``k`` (<= 227) 32-bit outputs of ``random.Random(seed)``
    for each seed (one column per seed)."""
    if not 0 < k <= MAX_OUTPUTS:
        raise ValueError(f"k must be in 1..{MAX_OUTPUTS}")
    out = np.empty((k, len(seeds)), dtype=np.uint32)
    for rows, key in seed_keys(seeds):
        for start in range(0, len(rows), _BATCH):
            out[:, rows[start : start + _BATCH]] = _outputs(_seeded(key[:, start : start + _BATCH], k), k)
    return out


_F1, _F2 = np.uint32(1664525), np.uint32(1566083941)  # init_by_array's two multipliers
_FACTORS = np.array([[_F1], [_F2]], dtype=np.uint32)
_INITS = [np.uint32(v) for v in _INIT]
_INDEX = [np.uint32(i) for i in range(N)]
_30 = np.uint32(30)


def _mix(prev: np.ndarray, factor, out: np.ndarray) -> np.ndarray:
    """out = (prev ^ (prev >> 30)) * factor (mod 2**32), in place."""
    np.right_shift(prev, _30, out=out)
    np.bitwise_xor(out, prev, out=out)
    return np.multiply(out, factor, out=out)


def _seeded(key: np.ndarray, k: int) -> np.ndarray:
    """init_by_array over a (key length, batch) uint32 key -> the seeded (624, batch) state's
    rows that the first ``k`` outputs read (``_Rows``).

    init_by_array's first loop sets mt[i] = (mt[i] ^ mix(mt[i-1], 1664525)) + key[j] + j, from
    init_genrand's state, i = 1..623 then 1 again; its second sets mt[i] = (mt[i] ^ mix(mt[i-1],
    1566083941)) - i, i = 2..623 then 1. The first loop's values are not stored: the second loop
    recomputes each as it goes (both in one stacked (2, batch) operation), so only a few vectors
    are live (a stored state is memory-bound). Keys as long as the state take ``_seeded_long``."""
    length, batch = key.shape
    if length >= N - 1:
        return _seeded_long(key)
    keyed = list(key + np.arange(length, dtype=np.uint32)[:, None])  # init_key[j] + j
    t = np.empty(batch, dtype=np.uint32)
    a = np.full(batch, _INIT[0], dtype=np.uint32)
    for i in range(1, N):  # the first loop's first pass, j = i - 1 (mod length)
        np.bitwise_xor(_mix(a, _F1, t), _INITS[i], out=t)
        np.add(t, keyed[(i - 1) % length], out=a)
        if i == 1:
            first1 = a.copy()
    # its 624th step wraps to i = 1, with mt[0] = mt[623]
    a1 = np.add(np.bitwise_xor(_mix(a, _F1, t), first1, out=t), keyed[(N - 1) % length])
    mt = _Rows(k, batch)
    state, mixed = np.stack([first1, a1]), np.empty((2, batch), dtype=np.uint32)
    (first, second), (mixed1, mixed2) = state, mixed
    for i in range(2, N):  # the second loop (second), replaying the first loop's mt[i] (first)
        _mix(state, _FACTORS, mixed)
        np.bitwise_xor(mixed1, _INITS[i], out=first)
        np.add(first, keyed[(i - 1) % length], out=first)
        np.bitwise_xor(mixed2, first, out=second)
        np.subtract(second, _INDEX[i], out=second)
        if i <= k or M <= i < M + k:
            mt[i] = second
    mt[1] = np.subtract(np.bitwise_xor(_mix(second, _F2, t), a1, out=t), _INDEX[1])  # wraps: mt[0] = mt[623]
    mt[0] = 0x80000000
    return mt


def _seeded_long(key: np.ndarray) -> np.ndarray:
    """init_by_array, the whole (624, batch) state stored (any key length)."""
    length, batch = key.shape
    keyed = key + np.arange(length, dtype=np.uint32)[:, None]
    t = np.empty(batch, dtype=np.uint32)
    mt = np.empty((N, batch), dtype=np.uint32)
    mt[:] = _INIT[:, None]
    i, j = 1, 0
    for _ in range(max(N, length)):
        np.add(np.bitwise_xor(_mix(mt[i - 1], _F1, t), mt[i], out=t), keyed[j], out=mt[i])
        i, j = i + 1, j + 1
        if i >= N:
            mt[0] = mt[N - 1]
            i = 1
        if j >= length:
            j = 0
    for _ in range(N - 1):
        np.subtract(np.bitwise_xor(_mix(mt[i - 1], _F2, t), mt[i], out=t), _INDEX[i], out=mt[i])
        i += 1
        if i >= N:
            mt[0] = mt[N - 1]
            i = 1
    mt[0] = 0x80000000
    return mt


class _Rows:
    """The rows of a seeded state that its first ``k`` outputs read: 0..k and 397..397+k-1."""

    def __init__(self, k: int, batch: int):
        self.k = k
        self.head = np.empty((k + 1, batch), dtype=np.uint32)
        self.tail = np.empty((k, batch), dtype=np.uint32)

    def __setitem__(self, i: int, value) -> None:
        if i <= self.k:
            self.head[i] = value
        else:
            self.tail[i - M] = value

    def __getitem__(self, rows: slice) -> np.ndarray:
        if rows.start is not None and rows.start >= M:
            return self.tail[rows.start - M : rows.stop - M]
        return self.head[rows]


def _outputs(mt, k: int) -> np.ndarray:
    """The seeded (624, batch) state -> its first ``k`` tempered outputs, (k, batch): output ``i``
    (< 227) twists mt[i], mt[i + 1] and mt[i + 397], none of them twisted before it."""
    y = (mt[:k] & np.uint32(0x80000000)) | (mt[1 : k + 1] & np.uint32(0x7FFFFFFF))
    odd = y & np.uint32(1)
    y >>= np.uint32(1)
    y ^= mt[M : M + k]
    y ^= odd * np.uint32(0x9908B0DF)
    y ^= y >> np.uint32(11)
    y ^= (y << np.uint32(7)) & np.uint32(0x9D2C5680)
    y ^= (y << np.uint32(15)) & np.uint32(0xEFC60000)
    y ^= y >> np.uint32(18)
    return y
