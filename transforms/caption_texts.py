"""Captions as texts for the near-duplicate stage (``transforms.near_captions``): Arrow string
arrays where Arrow takes the text (a Python list where it does not), their ids, and their words
(``split()``) as sorted ids."""

from __future__ import annotations

import numpy as np

_OTHER_SPACE = tuple(c for c in map(chr, range(0x3001)) if c.isspace() and c != " ")  # no space >= U+3001
_OTHER = "[" + "".join(f"\\x{{{ord(c):x}}}" for c in _OTHER_SPACE) + "]"  # RE2


def split_words(norms):
    """Captions (a list or an Arrow string array) -> (offsets, word ids, vocabulary): each
    caption's distinct words (``split()``) as sorted ids, CSR. Captions spaced by single spaces
    are split by Arrow; others in Python."""
    import pyarrow.compute as pc

    if not len(norms):
        return np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int64), []
    texts = as_texts(norms)
    if isinstance(texts, list):
        return _split_words_py(texts)
    lists = pc.split_pattern(texts, pattern=" ")
    encoded = lists.flatten().dictionary_encode()
    ids = encoded.indices.to_numpy(zero_copy_only=False)  # int32: no int64 copy (fresh pages cost system time)
    empty = pc.index(encoded.dictionary, "").as_py()  # "" pieces: from empty captions only, if regular
    blanks = int(np.count_nonzero(ids == empty)) if empty >= 0 else 0
    if (
        blanks != pc.sum(pc.equal(pc.binary_length(texts), 0)).as_py()
        or pc.any(pc.match_substring_regex(encoded.dictionary, _OTHER)).as_py()
    ):  # a caption not spaced by single spaces: ``split()`` in Python
        return _split_words_py(texts.to_pylist() if not isinstance(norms, list) else norms)
    vocab = encoded.dictionary.to_pylist()
    bits = len(vocab).bit_length()  # (caption << bits) | word id: one number a word, sorted
    packed = slots(None, np.diff(lists.offsets.to_numpy()), number=False)[0]
    packed <<= bits
    packed |= ids
    unique = packed[ids != empty] if blanks else packed
    unique.sort()
    if len(unique):
        keep = np.empty(len(unique), dtype=bool)
        keep[0] = True
        np.not_equal(unique[1:], unique[:-1], out=keep[1:])
        unique = unique[keep]
    offsets = np.zeros(len(norms) + 1, dtype=np.int64)
    np.cumsum(np.bincount(unique >> bits, minlength=len(norms)), out=offsets[1:])
    unique &= (1 << bits) - 1  # in place: the word ids
    return offsets, unique, vocab


def slots(first, counts, run: bool = True, number: bool = True) -> tuple:
    """Runs of ``counts[i]`` slots numbered ``first[i]``, ``first[i] + 1``, ... -> (the run of each
    slot, its number), int64 (each None unless asked for): ``np.repeat(arange, counts)`` and
    ``np.repeat(first - starts, counts) + arange``, each from one scatter and a running sum
    (np.repeat holds the GIL; these numpy calls do not)."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    some = np.flatnonzero(counts)  # runs with slots
    heads = np.cumsum(counts)[some]
    heads -= counts[some]  # each run's first slot
    runs = numbers = None
    if run:
        runs = np.zeros(total, dtype=np.int64)
        if total:
            runs[heads[1:]] = np.diff(some)
            runs[0] = some[0]
            np.cumsum(runs, out=runs)
    if number:
        numbers = np.ones(total, dtype=np.int64)
        if total:
            at = np.asarray(first, dtype=np.int64)[some]
            numbers[heads[0]] = at[0]
            numbers[heads[1:]] = at[1:] - at[:-1] - counts[some[:-1]] + 1  # from the previous run's last
            np.cumsum(numbers, out=numbers)
    return runs, numbers


def _split_words_py(norms: list[str]):
    vocab: dict[str, int] = {}
    ids: list[int] = []
    offsets = [0]
    for text in norms:
        ids.extend(sorted({vocab.setdefault(w, len(vocab)) for w in text.split()}))
        offsets.append(len(ids))
    return np.asarray(offsets, dtype=np.int64), np.asarray(ids, dtype=np.int64), list(vocab)


def as_texts(norms):
    """Captions -> an Arrow large_string array of them, or the list where Arrow does not take
    the text (e.g. a lone surrogate)."""
    import pyarrow as pa

    if not isinstance(norms, list):
        return norms
    try:
        return pa.array(norms, type=pa.large_string())
    except (pa.ArrowException, UnicodeError):
        return norms


def joined_texts(parts: list):
    """Caption arrays and lists (``as_texts``) -> one, in order."""
    import pyarrow as pa

    if all(isinstance(p, pa.Array) for p in parts):
        return pa.concat_arrays([p.cast(pa.large_string()) for p in parts]) if parts else []
    return [t for p in parts for t in (p if isinstance(p, list) else p.to_pylist())]


def caption_ids(norms):
    """Captions -> (int64 id of each, numbered in order of first appearance; the distinct
    captions, as ``as_texts``)."""
    texts = as_texts(norms)
    if isinstance(texts, list):
        index: dict[str, int] = {}
        ids = np.fromiter((index.setdefault(t, len(index)) for t in texts), dtype=np.int64, count=len(texts))
        return ids, list(index)
    encoded = texts.dictionary_encode()
    return encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64), encoded.dictionary


def take_texts(texts, idx: np.ndarray):
    """The texts (``as_texts``) at idx."""
    if isinstance(texts, list):
        return [texts[i] for i in idx.tolist()]
    return texts.take(idx)


def text_list(texts, idx: np.ndarray) -> list[str]:
    """The texts at ``idx``, as a list."""
    if isinstance(texts, list):
        return [texts[i] for i in idx.tolist()]
    return texts.take(idx).to_pylist()
