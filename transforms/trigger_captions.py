"""Caption codes of trigger mining, per distinct caption: exact duplicates, near duplicates and
template captions (``transforms.triggers.MineTriggers`` wires them).

Near duplicates go through MinHash LSH bands of *distinct* normalized captions: each record
batch sends each of its distinct captions (an Arrow array), with how many of its records carry it and its band
keys there, once to each bucket holding one of its band keys; a bucket's group sums the counts per band
key (a band with more than ``MAX_BAND`` records is an exact-template flood and is skipped, as
when every record was sent) and marks the captions near another in some band
(``transforms.near_captions``: numpy over word sets; ``near_norms`` is the pairwise rule). A
caption's bands depend on its text only, so a near caption is near for every record that
carries it: the marks join the records (as columns) by caption bucket, next to the exact
duplicates, and no per-record band entry is shipped. Template captions group the captions'
skeletons (``TemplateCodes``) from caption columns, so the stage that reads the frequent words
does not decode whole record batches again.

None of it needs the records' clusters but the exact duplicates (a caption on >= 2 records in
>= 2 clusters). From info tables (``CaptionGroups``) the records are grouped by caption before
the clusters are known: near codes leave at once, and only the records whose caption another
record has go on to meet their clusters (``trigger_join``; ~0.3% of LAION's rows), grouped
again by caption for ``caption_codes``. ``CaptionCodes`` is the same in one step, after the
clusters (the per-sample path).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from itertools import chain

import apache_beam as beam

from transforms.caption_texts import as_texts, joined_texts, take_texts
from transforms.captions import skeleton_of_norm
from transforms.key_batches import bucket_of, grouped
from transforms.near_captions import bucket_entries, minhash_rows, near_captions
from transforms.trigger_records import column

MAX_BAND = 200  # records in one band beyond which the band is not compared
MEMBERS, NEAR = 0, 1  # the two kinds of element grouped by caption


def group_codes(members: list, code: str, min_members: int = 2, min_clusters: int = 2) -> Iterator:
    """Members ((key, shard), cluster_id) of one caption -> (member, (code,)) when the caption
    is on >= min_members records in >= min_clusters clusters."""
    if len(members) >= min_members and len({c for _, c in members}) >= min_clusters:
        for key, _ in members:
            yield key, (code,)


def near_norms(norms, known: frozenset[str] | set[str] = frozenset()) -> set[str]:
    """The captions whose word set has Jaccard >= 0.8 with another's (in any order; the result
    does not depend on it). Pairs are taken in order of set size and cut where the sizes alone
    rule them out (Jaccard <= smaller / larger), so only sets of similar size are intersected;
    a pair of captions both already in ``known`` (or found here) is skipped, as it cannot add
    a caption to the union. Jaccard >= 0.8 is 5 x inter >= 4 x union, i.e. 9 x inter >= 4 x
    (size a + size b) (exact; two different captions' union is never empty): for sets of equal
    size (<= 8 words) that is equality, for sizes n and n + 1 (n <= 12) the smaller inside the
    larger, tested without building the intersection."""
    sets = sorted(((frozenset(n.split()), n) for n in norms), key=lambda s: (len(s[0]), s[1]))
    near: set[str] = set()
    for i, (a, na) in enumerate(sets):
        la = len(a)
        a_known = na in known
        for b, nb in sets[i + 1 :]:
            lb = len(b)
            if 5 * la < 4 * lb:  # la / lb < 0.8, and lb only grows from here
                break
            if (a_known or na in near) and (nb in known or nb in near):
                continue  # both marked already: the pair cannot mark anything new
            if lb == la:  # 9 x inter >= 8 x la: for la <= 8 only equal word sets
                hit = a == b if la <= 8 else 9 * len(a & b) >= 8 * la
            elif lb == la + 1 and la <= 12:  # 9 x inter >= 8 x la + 4: a inside b
                hit = a < b
            else:
                hit = 9 * len(a & b) >= 4 * (la + lb)
            if hit:
                near.update((na, nb))
    return near


def band_entries(batch: list[dict], n: int) -> Iterator[tuple[int, tuple]]:
    """A record batch -> (bucket, (captions, their records, keys' caption rows, keys' bands,
    keys' values)): ``caption_bands`` of its normalized captions."""
    return caption_bands(column(batch, "norm"), n)


def caption_bands(norms: list[str], n: int) -> Iterator[tuple[int, tuple]]:
    """A batch's normalized captions -> (bucket, (captions, their records, keys' caption rows,
    keys' bands, keys' values)): each distinct caption once per bucket that holds one of its
    band keys, with its band keys there (not its whole MinHash)."""
    texts, records = _distinct(norms)
    for b, rows, at, bands, values in bucket_entries(minhash_rows(texts), n):
        yield b, (take_texts(texts, rows), records[rows], at, bands, values)


def _distinct(norms):
    """Captions (a list or ``as_texts``' array) -> (the distinct ones in sorted order, as
    ``as_texts``; how many times each is there)."""
    import numpy as np

    if isinstance(norms, list):
        counts = sorted(Counter(norms).items())
        return as_texts([norm for norm, _ in counts]), np.array([c for _, c in counts], dtype=np.int64)
    import pyarrow.compute as pc

    found = pc.value_counts(norms)
    values = found.field("values")
    order = pc.sort_indices(values)  # UTF-8 byte order: Python's code point order
    return values.take(order), found.field("counts").take(order).to_numpy().astype(np.int64)


def _norm_column(batch) -> list:
    """A record batch -> [(its first key, its normalized captions as ``as_texts``)] (none when
    it is empty): an Arrow array crosses the shuffle as a few buffers."""
    keys = column(batch, "key")
    return [(keys[0], as_texts(column(batch, "norm")))] if len(keys) else []


def _bands_of_columns(item, n: int) -> Iterator[tuple[int, tuple]]:
    """(first key, [normalized captions of a batch]) -> ``caption_bands`` of each batch."""
    for norms in item[1]:
        yield from caption_bands(norms, n)


def near_in_bands(item, n: int) -> Iterator[tuple[int, list]]:
    """(bucket, band entries of batches) -> (caption bucket, [(caption, NEAR)]) for the captions
    near another in some band of the bucket of at most MAX_BAND records
    (``transforms.near_captions``)."""
    import numpy as np

    _, parts = item
    parts = list(parts)
    if not parts:
        return
    norms = joined_texts([part[0] for part in parts])
    start = np.cumsum([0] + [len(part[0]) for part in parts[:-1]])
    small = int(start[-1]) + len(parts[-1][0]) < 2**31  # int32 rows: half the bytes
    rows = np.concatenate(
        [part[2].astype(np.int32 if small else np.int64) + s for part, s in zip(parts, start.tolist(), strict=True)]
    )
    counts, bands, values = (np.concatenate([part[j] for part in parts]) for j in (1, 3, 4))
    near = near_captions(norms, counts, rows, bands, values, MAX_BAND)
    yield from _near_marks(near, n)


def _members(batch: list[dict], n: int, clusters: bool = True) -> Iterator[tuple[int, tuple]]:
    """A record batch -> (caption bucket, (MEMBERS, captions, keys, shards, cluster ids)):
    the records as columns, split by their caption's bucket. Without ``clusters`` (records not
    yet clustered: ``near_and_shared``) no cluster ids, and a batch of one shard sends its shard
    once (a string, not a column)."""
    norms = column(batch, "norm")
    buckets = [bucket_of(norm, n) for norm in norms] if n > 1 else [0] * len(norms)
    rows: dict[int, list[int]] = {}
    for i, b in enumerate(buckets):
        rows.setdefault(b, []).append(i)
    keys, shards = column(batch, "key"), column(batch, "shard")
    one = not clusters and len(shards) and shards.count(shards[0]) == len(shards)
    cids = column(batch, "cluster_id") if clusters else None
    for b, idx in sorted(rows.items()):
        shard = shards[0] if one else [shards[i] for i in idx]
        tail = (shard,) if cids is None else (shard, [cids[i] for i in idx])
        yield b, (MEMBERS, [norms[i] for i in idx], [keys[i] for i in idx], *tail)


def _near_marks(near: list[str], n: int) -> Iterator[tuple[int, tuple]]:
    """Near captions -> (caption bucket, (NEAR, captions))."""
    if n <= 1:
        if near:
            yield 0, (NEAR, near)
        return
    import zlib

    crc32 = zlib.crc32  # ``bucket_of``, inlined: a call less a caption
    out: list[list[str]] = [[] for _ in range(n)]
    for norm in near:
        out[crc32(norm.encode("utf-8", "surrogatepass")) % n].append(norm)
    for b, norms in enumerate(out):
        if norms:
            yield b, (NEAR, norms)


def _ids(values: list):
    """Values -> (int64 ids, one per distinct value, in order of first appearance; how many)."""
    import numpy as np

    index: dict = {}
    ids = np.fromiter((index.setdefault(v, len(index)) for v in values), dtype=np.int64, count=len(values))
    return ids, len(index), list(index)


def caption_codes(item, size: int = 50_000) -> Iterator:
    """(caption bucket, member columns and near marks) -> (shard, ``Batch`` of (key, (code,))),
    at most ``size`` a batch: duplicate_caption for the records of a caption on >= 2 records in
    >= 2 clusters, near_duplicate_caption for the records of a caption marked near. Batched by
    shard here (``triggers.CodesByShard`` passes batches on), not one element per record. A
    part's shards: a column, or one string for all its records."""
    import numpy as np
    import pandas as pd

    from transforms.shard_columns import Batch

    _, parts = item
    members, near = [], set()
    for part in parts:
        if part[0] == NEAR:
            near.update(part[1])
        else:
            members.append(part)
    if not members:
        return
    norms, keys, clusters = (list(chain.from_iterable(part[j] for part in members)) for j in (1, 2, 4))
    shards = list(chain.from_iterable([p[3]] * len(p[1]) if isinstance(p[3], str) else p[3] for p in members))
    duplicate, marked = _coded_rows(norms, clusters, near)
    rows = np.concatenate([duplicate, marked])
    if not len(rows):
        return
    codes = [("duplicate_caption",)] * len(duplicate) + [("near_duplicate_caption",)] * len(marked)
    shard, names = pd.factorize(_objects([shards[i] for i in rows.tolist()]), use_na_sentinel=False)
    order = np.argsort(shard, kind="stable")  # by shard, each in the order above
    bounds = np.searchsorted(shard[order], np.arange(len(names) + 1))
    for s in sorted(range(len(names)), key=names.__getitem__):
        at = order[bounds[s] : bounds[s + 1]].tolist()
        coded = list(zip(map(keys.__getitem__, rows[at].tolist()), map(codes.__getitem__, at), strict=True))
        for i in range(0, len(coded), size):
            yield names[s], Batch(coded[i : i + size])


def _coded_rows(norms: list, clusters: list, near: set):
    """Records' captions and clusters, the near captions -> the rows (ascending) of records whose
    caption is on >= 2 records in >= 2 clusters, and of those whose caption is near. Captions are
    numbered by one hash table (pandas, as a dict's equality); clusters are compared only for
    the few records of captions on >= 2 records."""
    import numpy as np
    import pandas as pd

    caption, distinct = pd.factorize(_objects(norms), use_na_sentinel=False)
    records = np.bincount(caption, minlength=len(distinct))
    multi = np.flatnonzero(np.take(records >= 2, caption))  # rows of captions on >= 2 records
    cap = caption[multi]
    cluster = pd.factorize(_objects([clusters[i] for i in multi.tolist()]), use_na_sentinel=False)[0]
    width = int(cluster.max()) + 1 if len(cluster) else 1
    pairs = np.unique(cap * width + cluster)  # the distinct (caption, cluster) pairs
    spread = np.bincount(pairs // width, minlength=len(distinct))
    duplicate = multi[spread[cap] >= 2]
    hit = np.fromiter(map(near.__contains__, distinct), dtype=bool, count=len(distinct)) if near else None
    marked = np.flatnonzero(np.take(hit, caption)) if near else multi[:0]
    return duplicate, marked


def _objects(values: list):
    """A list -> a 1-d object array of its values (``np.array`` would build rows of tuples)."""
    import numpy as np

    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


class CaptionCodes(beam.PTransform):
    """Record batches -> (member, (code,)) for duplicate and (when ``near``) near-duplicate
    captions, through ``n`` hash buckets of captions and of band keys (``CaptionGroups`` and
    ``caption_codes`` on the shared records is the same in two steps, the first before the
    clusters are known)."""

    def __init__(self, near: bool, n: int):
        super().__init__()
        self.near, self.n = near, n

    def expand(self, batches):
        members = batches | "Members" >> beam.FlatMap(_members, n=self.n)
        if self.near:
            members = (members, batches | "Near" >> NearMarks(self.n)) | "WithNearMarks" >> beam.Flatten()
        return members | "GroupCaptions" >> beam.GroupByKey() | "Codes" >> beam.FlatMap(caption_codes)


def near_and_shared(item) -> Iterator:
    """(caption bucket, member columns of clusters of one and near marks) -> (member,
    ("near_duplicate_caption",)) for the records of a caption marked near; tagged "shared",
    (shard, [(key, caption)]) for the records of a caption on >= 2 records: only those can be
    duplicate captions (``caption_codes`` once their clusters are known), so only they wait for
    the clusters."""
    import numpy as np

    _, parts = item
    near: set[str] = set()
    norms, keys, shards = [], [], []
    for part in parts:
        if part[0] == NEAR:
            near.update(part[1])
        else:
            norms.extend(part[1])
            keys.extend(part[2])
            shards.extend([part[3]] * len(part[1]) if isinstance(part[3], str) else part[3])
    if not norms:
        return
    caption, n_captions, distinct = _ids(norms)
    if near:
        marked = np.array([d in near for d in distinct], dtype=bool)[caption]
        for i in np.flatnonzero(marked).tolist():
            yield (keys[i], shards[i]), ("near_duplicate_caption",)
    by_shard: dict[str, list] = {}
    for i in np.flatnonzero(np.bincount(caption, minlength=n_captions)[caption] >= 2).tolist():
        by_shard.setdefault(shards[i], []).append((keys[i], norms[i]))
    for shard, pairs in sorted(by_shard.items()):
        yield beam.pvalue.TaggedOutput("shared", (shard, pairs))


class CaptionGroups(beam.PTransform):
    """Record batches of clusters of one (made before the clusters are known) -> {"near":
    (member, ("near_duplicate_caption",)), "shared": (shard, [(key, caption)]) for the records
    whose caption is on >= 2 records}: ``CaptionCodes`` less what needs the clusters (duplicate
    captions: ``caption_codes`` of the shared records' member columns with their clusters)."""

    def __init__(self, near: bool, n: int):
        super().__init__()
        self.near, self.n = near, n

    def expand(self, captions):
        members = captions | "Members" >> beam.FlatMap(_members, n=self.n, clusters=False)
        if self.near:
            members = (members, captions | "Near" >> NearMarks(self.n)) | "WithNearMarks" >> beam.Flatten()
        found = (
            members
            | "GroupCaptions" >> beam.GroupByKey()
            | "NearAndShared" >> beam.FlatMap(near_and_shared).with_outputs("shared", main="near")
        )
        return {"near": found.near, "shared": found.shared}


class NearMarks(beam.PTransform):
    """Record batches -> (caption bucket, (NEAR, captions)) for the captions near another: the
    batches' caption columns shuffled, their band entries grouped in ``n`` buckets of band keys."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def expand(self, batches):
        return (
            batches
            | "NormColumns" >> beam.FlatMap(_norm_column)
            | "ShuffleNorms" >> beam.GroupByKey()
            | "Bands" >> beam.FlatMap(_bands_of_columns, n=self.n)
            | "GroupBands" >> beam.GroupByKey()
            | "NearInBands" >> beam.FlatMap(near_in_bands, n=self.n)
        )


def caption_columns(batch: list[dict]) -> tuple[list, list, list]:
    """A record batch -> its normalized captions, keys and shards (all template mining reads:
    a small element for the stage that reads them again with the frequent words)."""
    return column(batch, "norm"), column(batch, "key"), column(batch, "shard")


def skeleton_buckets(columns: tuple, frequent, n: int) -> Iterator[tuple[int, list]]:
    """Caption columns -> (skeleton bucket, [(skeleton, ((key, shard), caption))]) for the
    captions that have a template skeleton."""
    out: dict[int, list] = {}
    for norm, key, shard in zip(*columns, strict=True):
        sk = skeleton_of_norm(norm, frequent)
        if sk is not None:
            out.setdefault(bucket_of(sk, n), []).append((sk, ((key, shard), norm)))
    yield from sorted(out.items())


def template_codes(item, min_count: int, min_distinct: int) -> Iterator:
    """(bucket, lists of (skeleton, (member, caption))) -> (member, ("template_caption",)) for
    skeletons on >= min_count captions with >= min_distinct different texts."""
    _, lists = item
    for _, members in sorted(grouped(lists).items()):
        if len(members) >= min_count and len({norm for _, norm in members}) >= min_distinct:
            for key, _ in members:
                yield key, ("template_caption",)


class TemplateCodes(beam.PTransform):
    """Record batches -> (member, ("template_caption",)): captions grouped by skeleton (rare
    words and numbers as slots; ``frequent``: a side input of the frequent words) through ``n``
    hash buckets of skeletons."""

    def __init__(self, frequent, n: int, min_count: int, min_distinct: int):
        super().__init__()
        self.frequent, self.n, self.min_count, self.min_distinct = frequent, n, min_count, min_distinct

    def expand(self, batches):
        return (
            batches
            | "Columns" >> beam.Map(caption_columns)
            | "Split" >> beam.FlatMap(skeleton_buckets, frequent=self.frequent, n=self.n)
            | "Group" >> beam.GroupByKey()
            | "PerGroup" >> beam.FlatMap(template_codes, min_count=self.min_count, min_distinct=self.min_distinct)
        )
