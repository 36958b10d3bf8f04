"""``trigger_counts.batch_counts`` summed over a bundle's record batches in arrays, not dicts.

A bundle's batches share most of their terms, words and (keyword, object) events; summing each
batch's counts into a dict of tuple keys costs Python work per key and batch. ``BundleCounts``
keeps terms and words as ids into bundle-wide string tables with a count array each, the
(term, object) mentions as pending id arrays (summed by a sort when read), and only what is
rare or per record (record counts, small-cluster pairs, rows with metadata objects) in a dict:
the tuple keys are built once per key and flush (``items``). ``object_mentions`` is
``trigger_counts.object_event_counts``' mask loop for the rows without metadata objects as
one matrix product (object words per row x words per object) and one gather.
"""

from __future__ import annotations

import numpy as np

from transforms.trigger_counts import (
    _split_objects,
    norm_words,
    object_events,
    pair_counts,
    word_counts,
)


class BundleCounts:
    """``batch_counts(batch, m, vocabulary, words=True, pairs_below=2)`` summed over the batches
    given to ``add``; ``items()`` -> (key, count) per key with a count (the sum's keys)."""

    def __init__(self, m: int, vocabulary: frozenset[str] | None):
        self.m, self.vocabulary = m, vocabulary
        self.objects = _split_objects(vocabulary) if vocabulary else ()
        self.term_index: dict[str, int] = {}
        self.word_index: dict[str, int] = {}
        self.term_n = np.zeros(1024, dtype=np.int64)
        self.word_n = np.zeros(1024, dtype=np.int64)
        self.mention_n = np.zeros(len(self.objects), dtype=np.int64)
        self.kw: list[tuple[np.ndarray, np.ndarray]] = []  # (term id x objects + object, count)
        self.kw_len = 0
        self.other: dict[tuple, int] = {}

    def __len__(self) -> int:
        """An upper bound of the distinct keys held."""
        return len(self.term_index) + len(self.word_index) + len(self.other) + self.kw_len + len(self.objects)

    def add(self, batch) -> None:
        other = self.other
        other[("n",)] = other.get(("n",), 0) + len(batch)
        for key, c in pair_counts(batch, self.m, 2):
            other[("p", *key)] = other.get(("p", *key), 0) + c
        term_ids, self.term_n = _ids_of(batch.vocab, self.term_index, self.term_n)
        self.term_n[term_ids] += np.bincount(batch.term_ids, minlength=len(batch.vocab))
        split = norm_words(batch)
        if split is None:  # Arrow cannot take the text: Python's split
            pairs = [(w, c) for w, c in word_counts(batch, None) if w]
            ids, self.word_n = _ids_of([w for w, _ in pairs], self.word_index, self.word_n)
            self.word_n[ids] += np.array([c for _, c in pairs], dtype=np.int64)
        else:
            words, _, at = split
            ids, self.word_n = _ids_of(words, self.word_index, self.word_n)
            self.word_n[ids] += np.bincount(at, minlength=len(words))
        if self.vocabulary is None:
            return
        for i in sorted(batch.objects):
            for key in object_events(batch.record(i), self.vocabulary):
                other[key] = other.get(key, 0) + 1
        if self.objects and len(batch):
            mentions, obj, term, count = object_mentions(batch, self.objects, split)
            self.mention_n += mentions
            if len(count):
                self.kw.append((term_ids[term] * len(self.objects) + obj, count))
                self.kw_len += len(count)

    def items(self) -> list[tuple[tuple, int]]:
        out = dict(self.other)
        terms = list(self.term_index)
        for t, c in zip(terms, self.term_n[: len(terms)].tolist(), strict=True):
            if c:
                out[("t", t)] = c
        words = list(self.word_index)
        for w, c in zip(words, self.word_n[: len(words)].tolist(), strict=True):
            if c and w:
                out[("w", w)] = c
        names = [obj for obj, _ in self.objects]
        for obj, c in zip(names, self.mention_n.tolist(), strict=True):
            if c:
                out[("mention", obj)] = out.get(("mention", obj), 0) + c
        if self.kw:
            codes = np.concatenate([k for k, _ in self.kw])
            order = np.argsort(codes, kind="stable")
            uniq, first = np.unique(codes[order], return_index=True)
            sums = np.add.reduceat(np.concatenate([c for _, c in self.kw])[order], first)
            n_obj = len(names)
            for code, c in zip(uniq.tolist(), sums.tolist(), strict=True):
                key = ("kw_mention", terms[code // n_obj], names[code % n_obj])
                out[key] = out.get(key, 0) + c
        return list(out.items())


def _ids_of(values, index: dict[str, int], counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Strings -> their ids in ``index`` (new ones appended), and ``counts`` grown to hold them."""
    ids = np.fromiter((index.setdefault(v, len(index)) for v in values), dtype=np.int64, count=len(values))
    if len(index) > len(counts):
        grown = np.zeros(max(2 * len(counts), len(index)), dtype=np.int64)
        grown[: len(counts)] = counts
        counts = grown
    return ids, counts


def object_mentions(batch, objects, split):
    """The object events of the batch's rows without metadata objects: (records mentioning
    each object (all its words among the row's normalized-caption words and terms), and per
    (object, term of such a record): object index, batch term id, records), as
    ``object_event_counts`` counts them: one sparse product of the rows' terms with the
    mention mask."""
    from scipy.sparse import csr_matrix

    n = len(batch)
    at = {w: j for j, w in enumerate(sorted({p for _, parts in objects for p in parts}))}
    has = np.zeros((len(at), n), dtype=bool)  # object word x row
    if split is not None:
        words, rows, ids = split
        found = np.array([at.get(w, -1) for w in words], dtype=np.int64)[ids]
        hit = found >= 0
        has[found[hit], rows[hit]] = True
    else:
        for i, norm in enumerate(batch.norm):
            for w in set(norm.split()).intersection(at):
                has[at[w], i] = True
    found = np.array([at.get(t, -1) for t in batch.vocab], dtype=np.int64)[batch.term_ids]
    hit = found >= 0
    has[found[hit], batch.term_rows()[hit]] = True
    mention = np.empty((len(objects), n), dtype=bool)  # object x row
    for o, (_, parts) in enumerate(objects):
        mention[o] = has[at[parts[0]]]
        for p in parts[1:]:
            mention[o] &= has[at[p]]
    if batch.objects:
        mention[:, list(batch.objects)] = False
    ones = np.ones(len(batch.term_ids), dtype=np.float32)
    rows_terms = csr_matrix((ones, batch.term_ids, batch.term_off), shape=(n, len(batch.vocab)))
    per_term = np.asarray(rows_terms.T @ mention.T.astype(np.float32))  # term x object: exact integers
    term, obj = np.nonzero(per_term)
    return np.count_nonzero(mention, axis=1), obj, term, per_term[term, obj].astype(np.int64)
