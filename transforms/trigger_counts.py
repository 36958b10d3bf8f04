"""Trigger mining's per-batch counts and codes on ``RecordBatch`` columns, with the per-record
references they equal (``tests/test_trigger_paths.py`` checks them against each other).

Terms are ids into the batch's vocabulary, so a batch's term counts are one ``bincount`` and
its (term, cluster) pair counts one ``unique`` over term id x local cluster index. Object events
(keyword -> object statistics) need, per object of the vocabulary, the records whose words (the
normalized caption's words and the terms) contain all of the object's words: a boolean mask per
object word (a whole-word match in the padded normalized captions, in Arrow, or rows holding
the term), then term counts over the masked rows. Rows with metadata objects (few, or none in
LAION's metadata) go through the per-record reference.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterator
from itertools import chain

import numpy as np

# --- per-record references -------------------------------------------------------------------


def _words(record: dict) -> set[str]:
    return set(record["norm"].split()) | set(record["terms"])


def _mentions(record: dict, obj: str, words: set[str] | None = None) -> bool:
    words = _words(record) if words is None else words
    return all(w in words for w in obj.split())


@functools.lru_cache(maxsize=256)
def _split_objects(objects: frozenset[str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Objects in sorted order with their words, once per object set."""
    return tuple((obj, tuple(obj.split())) for obj in sorted(objects))


def object_events(record: dict, vocabulary: frozenset[str]) -> Iterator[tuple]:
    """Counting events for keyword -> object statistics over captions not naming the object."""
    present = set(record["objects"])
    words = _words(record)
    for obj, parts in _split_objects(vocabulary | present if present else vocabulary):
        if all(w in words for w in parts):
            yield ("mention", obj)
            for w in record["terms"]:
                yield ("kw_mention", w, obj)
        elif obj in present:
            yield ("object", obj)
            for w in record["terms"]:
                yield ("both", w, obj)


def object_codes(record: dict, object_sig: dict) -> list[str]:
    """A record's object trigger codes: a significant (keyword, object) pair whose object the
    record's metadata has and its caption does not name."""
    codes = []
    present = set(record["objects"])
    for w in record["terms"]:
        for o, relation in sorted(object_sig.get(w, ())):
            if o in present and not _mentions(record, o):
                # unintended associations are acted on; implicit intended ones are only recorded
                codes.append(f"{'object_trigger' if relation == 'unintended' else 'implicit_object'}:{w}->{o}")
    return codes


def record_codes(record: dict, word_sig, object_sig) -> Iterator[tuple[str, tuple[str, ...]]]:
    """((key, shard), sorted codes) of one record, when it has any (the reference of ``batch_codes``)."""
    codes = [f"word_trigger:{w}" for w in record["terms"] if (w, record["cluster_id"]) in word_sig]
    codes += object_codes(record, object_sig)
    if codes:
        yield (record["key"], record["shard"]), tuple(sorted(codes))


# --- per batch, on columns -------------------------------------------------------------------


def term_counts(batch) -> list[tuple[str, int]]:
    """(term, records with it) over the batch (a record's terms are unique)."""
    counts = np.bincount(batch.term_ids, minlength=len(batch.vocab)).tolist()
    return [(t, c) for t, c in zip(batch.vocab, counts, strict=True) if c]


def pair_counts(batch, m: int, below: int | None = None) -> list[tuple[tuple, int]]:
    """((term, cluster id, cluster size), records) over the records in clusters of >= m (and
    < ``below``, when given)."""
    import pyarrow as pa

    sizes = batch.cluster_size
    rows = np.flatnonzero((sizes >= m) & (sizes < below) if below is not None else sizes >= m)
    if not len(rows):
        return []
    cid = batch.cluster_id
    encoded = pa.array([cid[r] for r in rows.tolist()], pa.string()).dictionary_encode()
    names = encoded.dictionary.to_pylist()
    width = int(sizes.max()) + 1
    clusters, local = sorted_unique(encoded.indices.to_numpy().astype(np.int64) * width + sizes[rows], inverse=True)
    row_local = np.full(len(batch), -1, dtype=np.int64)
    row_local[rows] = local
    entry_local = row_local[batch.term_rows()]
    keep = entry_local >= 0
    n = len(clusters)
    uniq, counts = sorted_unique(batch.term_ids[keep].astype(np.int64) * n + entry_local[keep], counts=True)
    vocab = batch.vocab
    pairs = [(names[c // width], c % width) for c in clusters.tolist()]
    return [((vocab[u // n], *pairs[u % n]), c) for u, c in zip(uniq.tolist(), counts.tolist(), strict=True)]


def sorted_unique(values: np.ndarray, counts: bool = False, inverse: bool = False):
    """``np.unique`` of an int array by a sort (numpy's hashing ``unique`` is slower here):
    the sorted distinct values, and their counts or each value's index among them."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    first = np.ones(len(ordered), dtype=bool)
    first[1:] = ordered[1:] != ordered[:-1]
    uniq = ordered[first]
    if counts:
        return uniq, np.diff(np.append(np.flatnonzero(first), len(ordered)))
    if inverse:
        where = np.empty(len(values), dtype=np.int64)
        where[order] = np.cumsum(first) - 1
        return uniq, where
    return uniq


def norm_words(batch):
    """Each (row, word) of the batch's normalized captions once, split in Arrow: (the words,
    rows, word ids), or None when Arrow cannot take the text (a lone surrogate). A normalized
    caption's only whitespace is single spaces (``normalize_caption``), so its words are its
    split at " " (an empty caption gives the word "", which no caller counts)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        lists = pc.split_pattern(pa.array(batch.norm, type=pa.large_string()), " ")
    except (pa.ArrowException, UnicodeEncodeError):
        return None
    encoded = pc.list_flatten(lists).dictionary_encode()
    words = encoded.dictionary.to_pylist()
    width = max(len(words), 1)
    rows = pc.list_parent_indices(lists).to_numpy().astype(np.int64)
    pairs = np.sort(rows * width + encoded.indices.to_numpy().astype(np.int64))
    pairs = pairs[np.append(True, pairs[1:] != pairs[:-1])] if len(pairs) else pairs
    return words, pairs // width, pairs % width


def word_counts(batch, split=None) -> list[tuple[str, int]]:
    """(word, normalized captions with it) over the batch (``norm_words``, or Python's split)."""
    split = norm_words(batch) if split is None else split
    if split is None:
        return list(Counter(w for norm in batch.norm for w in set(norm.split())).items())
    words, _, ids = split
    counts = np.bincount(ids, minlength=len(words))
    nonzero = np.flatnonzero(counts).tolist()
    return [(words[i], c) for i, c in zip(nonzero, counts[nonzero].tolist(), strict=True) if words[i]]


def _word_rows(batch, words: list[str], split=None) -> dict[str, np.ndarray]:
    """Each word -> a mask of the rows whose normalized caption has it as a word (``norm_words``,
    or Python's split when Arrow cannot take the text), or whose terms have it."""
    n = len(batch)
    masks = np.zeros((len(words), n), dtype=bool)
    split = norm_words(batch) if split is None else split
    at = {w: j for j, w in enumerate(words)}
    if split is not None:
        found = np.array([at.get(w, -1) for w in split[0]], dtype=np.int64)[split[2]]
        hit = found >= 0
        masks[found[hit], split[1][hit]] = True
    else:
        for i, norm in enumerate(batch.norm):
            for w in set(norm.split()).intersection(at):
                masks[at[w], i] = True
    index = {t: i for i, t in enumerate(batch.vocab)}
    term_rows = batch.term_rows()
    for j, w in enumerate(words):
        if w in index:
            masks[j, term_rows[batch.term_ids == index[w]]] = True
    return dict(zip(words, masks, strict=True))


def object_event_counts(batch, vocabulary: frozenset[str], split=None) -> list[tuple[tuple, int]]:
    """The batch's ``object_events``, counted: rows with metadata objects one by one, the others
    (which only mention objects) through a mask per object."""
    counts: Counter = Counter()
    for i in sorted(batch.objects):
        counts.update(object_events(batch.record(i), vocabulary))
    objects = _split_objects(vocabulary)
    n = len(batch)
    if not objects or not n:
        return list(counts.items())
    plain = np.ones(n, dtype=bool)
    plain[list(batch.objects)] = False
    has = _word_rows(batch, sorted({p for _, parts in objects for p in parts}), split)
    term_rows = batch.term_rows()
    for obj, parts in objects:
        mask = plain.copy()
        for p in parts:
            mask &= has[p]
        k = int(mask.sum())
        if not k:
            continue
        counts[("mention", obj)] += k
        per_term = np.bincount(batch.term_ids[mask[term_rows]], minlength=len(batch.vocab))
        nonzero = np.flatnonzero(per_term).tolist()
        for t, c in zip(nonzero, per_term[nonzero].tolist(), strict=True):
            counts[("kw_mention", batch.vocab[t], obj)] += c
    return list(counts.items())


EVENTS = ("mention", "kw_mention", "object", "both")  # the first item of an object event's key


def batch_counts(
    batch, m: int, vocabulary: frozenset[str] | None, words: bool = False, pairs_below: int | None = None
) -> list[tuple[tuple, int]]:
    """Every count of a batch under one kind of key, for one combine: ("n",) records,
    ("t", term), ("p", term, cluster id, cluster size) in clusters of >= m (and < ``pairs_below``
    when given: the larger ones are counted per cluster, ``cluster_pair_counts``), (unless
    ``vocabulary`` is None) the object events as they are (first item in ``EVENTS``) and (when
    ``words``) ("w", word) for the words of the normalized captions (``word_counts``)."""
    out: list[tuple[tuple, int]] = [(("n",), len(batch))]
    out += [(("t", t), c) for t, c in term_counts(batch)]
    out += [(("p", *k), c) for k, c in pair_counts(batch, m, pairs_below)]
    split = norm_words(batch) if words or (vocabulary and len(batch)) else None
    if vocabulary is not None:
        out += object_event_counts(batch, vocabulary, split)
    if words:
        out += [(("w", w), c) for w, c in word_counts(batch, split)]
    return out


def code_rows(batch, m: int) -> list:
    """The batch's rows that can carry a trigger code, as a batch (none: []): word triggers are
    (keyword, cluster) pairs counted over clusters of >= m records, object triggers need
    metadata objects."""
    rows = set(np.flatnonzero(batch.cluster_size >= m).tolist()) | set(batch.objects)
    if len(rows) == len(batch):
        return [batch]
    return [batch.take(sorted(rows))] if rows else []


def batch_codes(batch, word_sig: dict[str, set], object_sig: dict[str, set]) -> Iterator:
    """((key, shard), sorted codes) per record with any: word triggers ((term, cluster) in
    ``word_sig``: term -> clusters) and, for rows with metadata objects, object triggers."""
    codes: dict[int, list[str]] = {}
    index = {t: i for i, t in enumerate(batch.vocab)}
    sig_ids = [index[w] for w in word_sig if w in index]
    if sig_ids:
        hit = np.isin(batch.term_ids, sig_ids)
        cid = batch.cluster_id
        for r, t in zip(batch.term_rows()[hit].tolist(), batch.term_ids[hit].tolist(), strict=True):
            w = batch.vocab[t]
            if cid[r] in word_sig[w]:
                codes.setdefault(r, []).append(f"word_trigger:{w}")
    if object_sig:
        for i in batch.objects:
            found = object_codes(batch.record(i), object_sig)
            if found:
                codes.setdefault(i, []).extend(found)
    for r in sorted(codes):
        yield (batch.key[r], batch.shard[r]), tuple(sorted(codes[r]))


def clustered_captions(batch) -> list[tuple[str, str]]:
    """(cluster id, caption) of the records in clusters of more than one."""
    cid, caption = batch.cluster_id, batch.caption
    return [(cid[i], caption[i]) for i in np.flatnonzero(batch.cluster_size > 1).tolist()]


def clustered_members(batch, m: int) -> list[tuple[str, tuple]]:
    """(cluster id, (normalized caption, key, shard, cluster size, terms)) of the records in
    clusters of more than one; terms only for clusters of >= m records (``cluster_pair_counts``),
    else (). The per-member reference of ``trigger_clusters.member_columns``."""
    rows = np.flatnonzero(batch.cluster_size > 1).tolist()
    if not rows:
        return []
    cid, caption, key, shard = batch.cluster_id, batch.norm, batch.key, batch.shard
    sizes = batch.cluster_size.tolist()
    terms = _terms_of_rows(batch, batch.cluster_size >= max(m, 2))
    return [(cid[i], (caption[i], key[i], shard[i], sizes[i], terms.get(i, ()))) for i in rows]


def _terms_of_rows(batch, mask: np.ndarray) -> dict[int, tuple[str, ...]]:
    """{row: its terms} for the rows of ``mask`` (one gather of the term strings)."""
    rows = np.flatnonzero(mask)
    if not len(rows):
        return {}
    strings = np.array(batch.vocab, dtype=object)[batch.term_ids[mask[batch.term_rows()]]].tolist()
    ends = np.cumsum(np.diff(batch.term_off)[rows]).tolist()
    return {r: tuple(strings[a:b]) for r, a, b in zip(rows.tolist(), [0, *ends], ends, strict=False)}


def cluster_pair_counts(cluster: str, members: list[tuple], m: int) -> Iterator[tuple[tuple, int]]:
    """One cluster's ``clustered_members`` -> ((term, cluster id, cluster size), records) for the
    pairs on >= m of its records: every record of the cluster is here, so these are the
    pairs' whole counts (``pair_counts`` summed over every batch, pruned at m)."""
    by_size: dict[int, list] = {}  # one size per cluster, unless assignments disagree
    for member in members:
        if member[3] >= m:
            by_size.setdefault(member[3], []).append(member[4])
    for size, terms in sorted(by_size.items()):
        for term, n in sorted(Counter(chain.from_iterable(terms)).items()):
            if n >= m:
                yield (term, cluster, size), n


def norm_duplication(norms: list[str], full_share: float = 0.5, max_pairs: int = 50) -> dict:
    """``captions.cluster_duplication`` of captions whose normalized forms are ``norms``, equal
    to it to the bit: the pairwise Jaccard distances of the first ``max_pairs`` sorted captions
    come from one matrix product of their word indicators (the same int / int divisions), then
    Python's ``sum`` adds them in ``itertools.combinations`` order."""
    from transforms.captions import duplication_summary

    normalized = sorted(norms)
    return duplication_summary(normalized, full_share, _mean_distance(normalized[:max_pairs]))


def _mean_distance(normalized: list[str]) -> float:
    """The mean of 1 - Jaccard over every pair of the captions' word sets (0.0 for < 2)."""
    k = len(normalized)
    if k < 2:
        return 0.0
    if k <= 4:  # a few pairs: the sets themselves
        from transforms.captions import jaccard

        sets = [frozenset(c.split()) for c in normalized]
        return sum(1 - jaccard(sets[i], sets[j]) for i in range(k) for j in range(i + 1, k)) / (k * (k - 1) // 2)
    distinct: dict[str, int] = {}
    at = np.array([distinct.setdefault(c, len(distinct)) for c in normalized], dtype=np.int64)
    if len(distinct) == 1:  # one caption repeated: every distance 1 - 1.0, summed
        return 0.0
    if len(distinct) <= 6 and k <= 30:  # a few distinct captions: their distances, then a lookup per pair
        from transforms.captions import jaccard

        sets = [frozenset(c.split()) for c in distinct]
        table = [[1 - jaccard(a, b) for b in sets] for a in sets]
        ids = at.tolist()
        return sum(table[ids[i]][ids[j]] for i in range(k) for j in range(i + 1, k)) / (k * (k - 1) // 2)
    index: dict[str, int] = {}
    rows = [[index.setdefault(w, len(index)) for w in set(c.split())] for c in distinct]
    has = np.zeros((len(rows), max(len(index), 1)), dtype=np.float64)
    for r, ids in enumerate(rows):
        has[r, ids] = 1.0
    inter = (has @ has.T).astype(np.int64)
    size = np.diagonal(inter)
    i, j = _pairs(k)
    both, union = inter[at[i], at[j]], size[at[i]] + size[at[j]] - inter[at[i], at[j]]
    dist = 1 - np.divide(both, union, out=np.ones(len(both)), where=union > 0)  # two empty sets: 1.0
    return sum(dist.tolist()) / len(both)


@functools.lru_cache(maxsize=64)
def _pairs(k: int) -> tuple[np.ndarray, np.ndarray]:
    """(0, 1), (0, 2), ..., (1, 2), ...: ``itertools.combinations``' order of k items' pairs."""
    return np.triu_indices(k, 1)
