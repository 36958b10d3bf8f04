"""Word sets of distinct captions and the set algebra of the near-duplicate caption rule
(``transforms.near_captions``): captions numbered by word set, CSR word ids, exact
intersections in bounded runs, and the subset join (each bigger set less one word, joined with
the sets by one sort of additive word hashes, every hit checked word by word)."""

from __future__ import annotations

import numpy as np

from transforms.caption_texts import slots, split_words


def _word_sets(norms: list[str]):
    """Distinct captions -> (set of each caption, numbered in order of first appearance; CSR of
    the sets' sorted word ids: offsets, ids; number of words)."""
    import pandas as pd

    offsets, ids, vocab = split_words(norms)
    sizes = np.diff(offsets)
    running = np.zeros(len(ids) + 1, dtype=np.uint64)  # running sums of word hashes, one buffer
    np.cumsum(_word_hashes(len(vocab))[ids], out=running[1:])
    sums = running[offsets[1:]] - running[offsets[:-1]]  # each caption's word hashes summed, mod 2**64
    key = sums ^ (sizes.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))  # the size mixed in
    cap_set = pd.factorize(key)[0].astype(np.int64)  # numbered in order of first appearance
    reps = _firsts(cap_set)  # each set's first caption
    later = np.flatnonzero(np.arange(len(cap_set)) != reps[cap_set])  # the other captions of a set
    rep = reps[cap_set[later]]
    if not (
        np.array_equal(sizes[later], sizes[rep])
        and np.array_equal(_words_of(later, offsets, ids), _words_of(rep, offsets, ids))
    ):
        return _word_sets_exact(offsets, ids, len(vocab))  # two sets with one hash: by the words
    set_offsets = np.zeros(len(reps) + 1, dtype=np.int64)
    np.cumsum(sizes[reps], out=set_offsets[1:])
    return cap_set, set_offsets, _words_of(reps, offsets, ids), len(vocab)


def _words_of(rows: np.ndarray, offsets: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The word ids of CSR ``rows``, concatenated."""
    return ids[slots(offsets[rows], np.diff(offsets)[rows], run=False)[1]]


def _word_sets_exact(offsets: np.ndarray, ids: np.ndarray, v: int):
    set_of: dict[tuple, int] = {}
    cap_set = np.empty(len(offsets) - 1, dtype=np.int64)
    words: list[int] = []
    set_offsets = [0]
    for i in range(len(offsets) - 1):
        key = tuple(ids[offsets[i] : offsets[i + 1]].tolist())
        s = set_of.get(key)
        if s is None:
            s = set_of[key] = len(set_of)
            words.extend(key)
            set_offsets.append(len(words))
        cap_set[i] = s
    return cap_set, np.asarray(set_offsets, dtype=np.int64), np.asarray(words, dtype=np.int64), v


def _word_hashes(v: int) -> np.ndarray:
    return np.random.default_rng(0x5EED).integers(0, 2**63, size=max(1, v), dtype=np.int64).view(np.uint64) * np.uint64(
        2
    ) + np.uint64(1)


def _intersections(a: np.ndarray, b: np.ndarray, offsets: np.ndarray, words: np.ndarray, v: int, limit: int = 1 << 24):
    """|A & B| for pairs of sets (CSR of sorted word ids): both sets' words tagged with the pair,
    sorted as one array of numbers, a word of both a repeated number; in runs of pairs of at
    most ``limit`` words (one pair more where a pair alone has more), so memory stays bounded."""
    if not len(a) or not len(words):
        return np.zeros(len(a), dtype=np.int64)
    sizes = np.diff(offsets)
    ends = np.cumsum(sizes[a] + sizes[b])
    cuts = np.unique(np.searchsorted(ends, np.arange(limit, int(ends[-1]), limit), "right"))
    bounds = [0, *cuts[(cuts > 0) & (cuts < len(a))].tolist(), len(a)]
    bits = max(1, v).bit_length()
    out = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        both = np.concatenate([a[lo:hi], b[lo:hi]])
        tagged, at = slots(offsets[both], sizes[both])  # each word's entry of ``both``, its position
        np.subtract(tagged, hi - lo, out=tagged, where=tagged >= hi - lo)  # the pair
        tagged <<= bits
        tagged |= np.take(words, at)
        tagged.sort()
        out.append(np.bincount(tagged[1:][tagged[1:] == tagged[:-1]] >> bits, minlength=hi - lo))
    return np.concatenate(out)


def _less_one(a: np.ndarray, b: np.ndarray, j: np.ndarray, offsets: np.ndarray, words: np.ndarray) -> np.ndarray:
    """Whether set A's sorted words are set B's less B's j-th (pairs with b = a + 1)."""
    la = np.diff(offsets)[a]
    owner, t = slots(np.zeros(len(a), dtype=np.int64), la)  # the pair, the position in A
    wa = words[offsets[a][owner] + t]
    wb = words[offsets[b][owner] + t + (t >= j[owner])]
    return np.bincount(owner[wa != wb], minlength=len(a)) == 0


def _equal_join(keys: np.ndarray, query: np.ndarray):
    """-> (query index, key index) for every pair of equal high bits (a superset of the equal
    pairs; the caller checks each): keys and queries as one sorted array of numbers (the high
    bits, the index in the low bits), so a run of one value holds its keys first."""
    return _joined(np.concatenate([keys, query]).astype(np.uint64, copy=False), len(keys))


def _joined(packed: np.ndarray, k: int):
    """``_equal_join`` of keys ``packed[:k]`` and queries ``packed[k:]`` (uint64, overwritten)."""
    n = len(packed)
    if not k or k == n:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    bits = (n - 1).bit_length()
    low = np.uint64((1 << bits) - 1)
    packed &= ~low  # in place from here: fresh pages cost system time
    packed |= np.arange(n, dtype=np.uint64)
    packed.sort()
    idx = (packed & low).view(np.int64)
    packed &= ~low
    new = np.ones(n, dtype=bool)
    np.not_equal(packed[1:], packed[:-1], out=new[1:])
    del packed
    run = new.astype(np.int32 if n < 2**31 else np.int64)  # then summed in place: a bool cumsum
    np.cumsum(run, out=run)  # with a dtype holds the GIL
    run -= 1
    is_key = idx < k
    n_keys = np.bincount(run[is_key], minlength=int(run[-1]) + 1)  # the first entries of their run
    with_keys = np.take(n_keys > 0, run)  # bool masks, in place: fresh pages cost system time
    with_keys &= np.greater_equal(idx, k, out=is_key)
    at = np.flatnonzero(with_keys)  # queries with keys in their run
    count = n_keys[run[at]]
    qi = np.repeat(idx[at] - k, count)
    first = np.flatnonzero(new)[run[at]]
    return qi, idx[np.repeat(first - np.cumsum(count) + count, count) + np.arange(int(count.sum()))]


def _subset_pairs(offsets: np.ndarray, words: np.ndarray, v: int, among: np.ndarray):
    """Pairs (A, B) of sets (both ``among``) with A inside B, b = a + 1, 4 <= a <= 8 (d = 1,
    a + b <= 17)."""
    sizes = np.diff(offsets)
    running = np.zeros(len(words) + 1, dtype=np.uint64)  # running sums of word hashes, one buffer
    np.take(_word_hashes(v), words, out=running[1:], mode="clip")  # clip: no buffered copy
    np.cumsum(running[1:], out=running[1:])
    sums = running[offsets[1:]] - running[offsets[:-1]]  # each set's word hashes summed, mod 2**64
    small = np.flatnonzero((sizes >= 4) & (sizes <= 8) & among)
    big = np.flatnonzero((sizes >= 5) & (sizes <= 9) & among)
    if not len(small) or not len(big):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    owner, pos = slots(offsets[big], sizes[big])  # B's words: B, their positions
    owner = np.take(big.astype(np.int32) if len(sizes) < 2**31 else big, owner)
    keys = np.take(sums, small)
    query = np.take(sums, owner)
    query -= np.take(running, pos + 1)  # B less one word (its hash: a step of the running sums)
    query += np.take(running, pos)
    del running
    maybe = _maybe_in(keys, query)  # few queries meet a key: only those go into the join's sort
    both = np.concatenate([keys, query[maybe]])
    del query
    qi, ki = _joined(both, len(small))
    qi = maybe[qi]
    del both
    a, b, j = small[ki], owner[qi], pos[qi] - offsets[owner[qi]]
    keep = sizes[a] == sizes[b] - 1
    a, b, j = a[keep], b[keep], j[keep]
    exact = _less_one(a, b, j, offsets, words)  # the hash hit, checked
    return a[exact], b[exact]


def _maybe_in(keys: np.ndarray, query: np.ndarray) -> np.ndarray:
    """The queries (uint64) whose top bits equal some key's (a superset of those equal to one):
    a table of at least 16 slots a key, indexed by the top bits, so most others drop out."""
    bits = min(30, max(8, (16 * len(keys)).bit_length()))
    shift = np.uint64(64 - bits)
    seen = np.zeros(1 << bits, dtype=bool)
    seen[keys >> shift] = True
    return np.flatnonzero(np.take(seen, query >> shift))


def _firsts(ids: np.ndarray) -> np.ndarray:
    """Ids numbered in order of first appearance -> the index of each id's first appearance."""
    is_first = np.ones(len(ids), dtype=bool)
    is_first[1:] = ids[1:] > np.maximum.accumulate(ids)[:-1]
    return np.flatnonzero(is_first)
