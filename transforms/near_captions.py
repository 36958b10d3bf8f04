"""Near-duplicate captions through MinHash LSH bands, vectorised over distinct word sets.

The rule (``transforms.trigger_captions``): a caption is near when it shares a band key with
another distinct caption whose word set has Jaccard >= 0.8 with its own, in a band of at most
``MAX_BAND`` records. A bucket receives, per record batch, its distinct captions and their band
keys in the bucket (``bucket_entries``: band number and values, not the whole MinHash). The keys
are grouped (one sort of hash prefixes, checked against the keys); only captions with an
eligible key (>= 2 captions, <= ``MAX_BAND`` records) are split into words. A caption's MinHash
depends on its word set only, so every caption of one word set has the same band keys, and the
rule is decided per word set:

- a set carried by two or more distinct captions is near when one of its bands is eligible;
- two different sets A, B (sizes a <= b) are near when 9 x |A & B| >= 4 x (a + b), i.e. their
  symmetric difference d has 9 d <= a + b, and they share an eligible band. For a + b <= 17
  that is d = 1: A inside B with b = a + 1 and a >= 4, found by joining each B less one word
  with the sets (additive word hashes, joined by one sort; every hit checked word by word). For
  a + b >= 18 both have >= 8 words: those pairs are taken from the eligible band groups and
  intersected exactly.

Everything is numpy over arrays of sets, words and band entries; no candidate pair of small
sets is ever listed.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from transforms.caption_texts import caption_ids, split_words, take_texts, text_list
from transforms.word_sets import _firsts, _intersections, _subset_pairs, _word_sets

NUM_PERM, BANDS, SEED = 64, 16, 1
ROWS = NUM_PERM // BANDS
_PRIME = np.uint64(0x100000001B3)
_STEP = 1 << 20  # entries a step where temporaries are made in steps (8 MB of int64: back from the heap)


def minhash_rows(norms) -> np.ndarray:
    """Normalized captions -> their MinHash values (len x NUM_PERM, datasketch's exactly: the
    element-wise minimum of the words' one-word MinHashes; no word gives the empty MinHash)."""
    from transforms.captions import _word_vector

    offsets, ids, vocab = split_words(norms)
    empty = _word_vector("", NUM_PERM, SEED)
    if not len(ids):
        return np.tile(empty, (len(norms), 1))
    table = np.stack([_word_vector(w, NUM_PERM, SEED) for w in vocab])
    sizes = np.diff(offsets)
    order = np.argsort(-sizes, kind="stable")  # by size, largest first
    down = -sizes[order]
    some = int(np.searchsorted(down, 0))  # captions with a word
    start = offsets[:-1][order[:some]]
    acc = table[ids[start]]
    for j in range(1, int(-down[0]) if some else 0):  # the j-th word of the captions that have one
        c = int(np.searchsorted(down, -j))
        np.minimum(acc[:c], table[ids[start[:c] + j]], out=acc[:c])
    out = np.tile(empty, (len(norms), 1))
    out[order[:some]] = acc
    return out


def band_mix(hv: np.ndarray) -> np.ndarray:
    """MinHash rows -> a stable 64-bit hash of each band key (rows x BANDS): the band number
    and the band's values."""
    return entry_mix(np.arange(BANDS), hv.reshape(len(hv), BANDS, ROWS))


def entry_mix(bands: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Band numbers (broadcast against ``values``' leading axes) and band values (..., ROWS)
    -> ``band_mix`` of each."""
    if values.dtype == np.uint32 and ROWS % 2 == 0:  # two values a word: half the multiplies
        values = np.ascontiguousarray(values).view(np.uint64)
    else:
        values = values.astype(np.uint64)
    mix = np.empty(values.shape[:-1], dtype=np.uint64)  # one array: fresh pages cost system time
    mix[...] = bands
    mix += np.uint64(1)
    shifted = np.empty_like(mix)  # one buffer for every step (fresh pages cost system time)
    for j in range(values.shape[-1]):
        mix *= _PRIME
        mix += values[..., j]  # wraps mod 2**64: deterministic
        mix ^= np.right_shift(mix, np.uint64(29), out=shifted)
    return mix


def bucket_entries(hv: np.ndarray, n: int) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """MinHash rows -> per bucket of band keys (of ``n``): (bucket, the rows with a band key
    there, the keys' rows among those (int32), their bands (uint8), their values (keys x ROWS))."""
    mix = band_mix(hv)
    buckets = ((mix >> np.uint64(1)) % np.uint64(max(1, n))).astype(np.int64).ravel()
    order = np.argsort(buckets, kind="stable")  # by bucket, then row, then band
    bounds = np.searchsorted(buckets[order], np.arange(max(1, n) + 1))
    values = hv.reshape(len(hv), BANDS, ROWS)
    for b in range(max(1, n)):
        at = order[bounds[b] : bounds[b + 1]]
        if not len(at):
            continue
        row, band = at // BANDS, at % BANDS
        here = np.zeros(len(hv), dtype=bool)
        here[row] = True
        local = np.cumsum(here, dtype=np.int64) - 1
        yield b, np.flatnonzero(here), local[row].astype(np.int32), band.astype(np.uint8), values[row, band]


def _band_groups(mix: np.ndarray, vals: np.ndarray, k_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Band entries -> (order grouping equal keys together, first-of-group flags in that order):
    sorted by the keys' hash (its high bits, the entry's index in the low bits: one sort of
    numbers instead of an argsort), then each run of one hash prefix checked to hold one key
    (the keys' rows gathered in that order a run of entries at a time, compared with their
    neighbours); a run that holds several is sorted by the keys. ``mix`` is overwritten."""
    bits = max(1, (len(mix) - 1).bit_length())
    low = np.uint64((1 << bits) - 1)
    packed = mix  # in place from here, temporaries in steps: fresh pages cost system time
    packed &= ~low
    for lo in range(0, len(packed), _STEP):
        packed[lo : lo + _STEP] |= np.arange(lo, min(lo + _STEP, len(packed)), dtype=np.uint64)
    packed.sort()
    order = (packed & low).view(np.int64)
    packed &= ~low
    new = np.ones(len(order), dtype=bool)
    np.not_equal(packed[1:], packed[:-1], out=new[1:])  # another hash prefix
    del packed
    pairs = vals.dtype == np.uint32 and vals.shape[1] % 2 == 0  # two uint32 as one uint64
    rows = np.ascontiguousarray(vals).view(np.uint64) if pairs else vals
    band = k_idx[order]
    differ = band[1:] != band[:-1]
    for lo in range(0, len(order) - 1, _STEP):
        keys = np.take(rows, order[lo : lo + _STEP + 1], axis=0)  # np.take: a row at a time, fast
        for j in range(keys.shape[1]):
            differ[lo : lo + _STEP] |= keys[1:, j] != keys[:-1, j]
    differ &= ~new[1:]  # two keys in one run
    if differ.any():
        starts = np.flatnonzero(new)
        bad = np.unique(np.searchsorted(starts, np.flatnonzero(differ), "right") - 1)  # those runs
        lens = np.append(starts[1:], len(order))[bad] - starts[bad]
        at = np.repeat(starts[bad] - np.cumsum(lens) + lens, lens) + np.arange(int(lens.sum()))
        run = np.repeat(np.arange(len(bad)), lens)
        sub = order[at]
        cols = [k_idx] + [rows[:, j] for j in range(rows.shape[1])]
        sub = sub[np.lexsort(tuple(col[sub] for col in reversed(cols)) + (run,))]
        order[at] = sub
        change = run[1:] != run[:-1]
        for col in cols:
            change |= col[sub[1:]] != col[sub[:-1]]
        new[at[1:]] = change
    return order, new


def near_sets(set_caps, s_idx, k_idx, gid, offsets, words, v) -> np.ndarray:
    """Per word set (each with an eligible band here): near (see the module). ``s_idx``,
    ``k_idx``, ``gid``: the sets' eligible band entries (set, band, group), grouped by ``gid``."""
    near = set_caps >= 2  # one set's own captions: any eligible band
    groups = np.full((len(set_caps), BANDS), -1, dtype=np.int64 if len(gid) and gid[-1] >= 2**31 else np.int32)
    groups[s_idx, k_idx] = gid  # -1: no eligible band here
    a, b = _subset_pairs(offsets, words, v, np.ones(len(set_caps), dtype=bool))
    share = _shared_groups(groups, a, b)
    near[a[share]] = near[b[share]] = True
    sizes = np.diff(offsets)
    for a, b in _large_pairs(s_idx, gid, sizes):
        open_ = ~(near[a] & near[b])  # a pair of near sets cannot add one
        a, b = a[open_], b[open_]
        hit = 9 * _intersections(a, b, offsets, words, v) >= 4 * (sizes[a] + sizes[b])
        near[a[hit]] = near[b[hit]] = True
    return near


def _shared_groups(groups: np.ndarray, a: np.ndarray, b: np.ndarray, step: int = 1 << 15) -> np.ndarray:
    """Pairs of sets -> whether they share an eligible band group (``groups``: each set's group
    per band, -1 for none); in runs of ``step`` pairs through the same few buffers (fresh pages
    cost system time)."""
    share = np.zeros(len(a), dtype=bool)
    m = min(step, len(a))
    ga, gb = np.empty((m, groups.shape[1]), groups.dtype), np.empty((m, groups.shape[1]), groups.dtype)
    same, some = np.empty((m, groups.shape[1]), bool), np.empty((m, groups.shape[1]), bool)
    for lo in range(0, len(a), step):
        k = min(step, len(a) - lo)
        np.take(groups, a[lo : lo + k], axis=0, out=ga[:k], mode="clip")  # clip: no buffered copy
        np.take(groups, b[lo : lo + k], axis=0, out=gb[:k], mode="clip")
        np.equal(ga[:k], gb[:k], out=same[:k])
        same[:k] &= np.greater_equal(ga[:k], 0, out=some[:k])
        np.any(same[:k], axis=1, out=share[lo : lo + k])
    return share


def _large_pairs(members: np.ndarray, gid: np.ndarray, sizes: np.ndarray, chunk: int = 1 << 22):
    """Chunks of distinct pairs of sets of >= 8 words in one eligible band group (contiguous
    ``gid``) whose sizes allow Jaccard >= 0.8 and sum to >= 18. An entry with f followers in its
    group pairs with each of them: all pairs of a run of entries at once (``np.repeat``); a chunk
    holds at least ``chunk`` pairs (the last one fewer), so the memory stays bounded."""
    keep = sizes[members] >= 8
    members, gid = members[keep], gid[keep]
    if len(members) < 2:
        return
    new = np.ones(len(gid), dtype=bool)
    np.not_equal(gid[1:], gid[:-1], out=new[1:])
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], len(gid))
    followers = np.repeat(ends - 1, ends - starts)
    followers -= np.arange(len(gid))
    total = np.cumsum(followers)
    codes, held, lo = [], 0, 0
    while lo < len(gid):
        base = int(total[lo - 1]) if lo else 0
        hi = max(lo + 1, int(np.searchsorted(total, base + min(chunk, 1 << 16), side="right")))  # small runs:
        f = followers[lo:hi]  # their arrays come back from the heap (fresh pages cost system time)
        x = np.repeat(np.arange(lo, hi), f)  # each entry once per follower ...
        y = np.arange(1, len(x) + 1) - np.repeat(total[lo:hi] - f - base, f)
        y += x  # ... with each follower: x + 1, ..., x + f
        x, y = members[x], members[y]
        sx, sy = sizes[x], sizes[y]
        la, lb = np.minimum(sx, sy), np.maximum(sx, sy)
        ok = 5 * la >= 4 * lb
        ok &= la + lb >= 18
        x, y = x[ok], y[ok]
        codes.append(np.minimum(x, y) * len(sizes) + np.maximum(x, y))
        held += len(x)
        if held >= chunk:
            yield _decoded(codes, len(sizes))
            codes, held = [], 0
        lo = hi
    if held:
        yield _decoded(codes, len(sizes))


def _marked(ids: np.ndarray, n: int) -> np.ndarray:
    """The distinct ids (< n), sorted (``np.unique`` without its sort)."""
    mark = np.zeros(n, dtype=bool)
    mark[ids] = True
    return np.flatnonzero(mark)


def _decoded(codes: list, n: int):
    code = np.sort(np.concatenate(codes))
    code = code[np.append(True, code[1:] != code[:-1])] if len(code) else code
    return code // n, code % n


def near_captions(norms, counts: np.ndarray, rows: np.ndarray, bands: np.ndarray, values: np.ndarray, max_band: int):
    """One bucket's captions (a caption may repeat), their records, and its band keys (their
    caption's row in ``norms``, band number, band values) -> the near captions by them (in order
    of first appearance). Only captions with a band key of >= 2 captions and <= ``max_band`` records are split into
    words."""
    cap_of, distinct = caption_ids(norms)
    if not len(distinct):
        return []
    order, new = _band_groups(entry_mix(bands, values), values, bands)
    packed = _entry_columns(cap_of, counts, rows, bands, order, max_band)
    del order
    field = np.bitwise_and(packed, 1 << 23)  # one buffer for both fields: fresh pages cost system time
    first = field != 0
    starts = np.flatnonzero(new)
    gid = new.astype(np.int32 if len(new) < 2**31 else np.int64)  # then summed in place: a bool
    np.cumsum(gid, out=gid)  # cumsum with a dtype holds the GIL
    gid -= 1
    if len(packed):  # >= 2 captions, <= max_band records (each row's records: every key's group)
        eligible = (np.add.reduceat(first, starts, dtype=np.int64) >= 2) & (
            np.add.reduceat(np.bitwise_and(packed, (1 << 23) - 1, out=field), starts) <= max_band
        )
    else:
        eligible = new[:0]
    del field
    keep = np.take(eligible, gid)
    keep &= first
    ok = np.flatnonzero(keep)
    packed, gid = packed[ok], gid[ok]
    band = packed >> 24
    band &= 0xFF
    cap = np.right_shift(packed, 32, out=packed)
    cand = _marked(cap, len(distinct))
    if not len(cand):
        return []
    local = np.full(len(distinct), -1, dtype=np.int64)
    local[cand] = np.arange(len(cand))
    texts = take_texts(distinct, cand)
    cap_set, offsets, words, v = _word_sets(texts)
    rep = np.zeros(len(cand), dtype=bool)
    rep[_firsts(cap_set)] = True  # a set's keys: those of its first caption
    c = local[cap]
    on = rep[c]
    near = near_sets(np.bincount(cap_set), cap_set[c[on]], band[on], gid[on], offsets, words, v)
    return text_list(texts, np.flatnonzero(near[cap_set]))


def _entry_columns(cap_of, counts, rows, bands, order, max_band: int) -> np.ndarray:
    """Band entries, in ``order`` -> one int64 each, gathered once: caption << 32 | band << 24 |
    whether the row is its caption's first << 23 | the row's records (at most max_band + 1)."""
    if not 0 <= max_band < (1 << 22):
        raise ValueError(f"max_band {max_band}: records a band key are packed in 23 bits")
    once = np.zeros(len(cap_of), dtype=bool)
    once[_firsts(cap_of)] = True  # a caption's first row: its keys once
    row = (cap_of << 32) | (once.astype(np.int64) << 23) | np.minimum(counts, max_band + 1)
    packed = np.take(row, rows)  # in the rows' order (a gather that runs along ``row``)
    for lo in range(0, len(packed), _STEP):  # the bands in steps: fresh pages cost system time
        packed[lo : lo + _STEP] |= np.left_shift(bands[lo : lo + _STEP], 24, dtype=np.int64)
    return np.take(packed, order)
