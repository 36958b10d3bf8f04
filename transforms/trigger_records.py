"""Trigger mining's inputs as batches: one list of caption records per shard (chunked), and the
per-batch counting and bucketing that ``transforms.triggers.MineTriggers`` combines.

A record is what the miners need of one ok sample: key, shard, caption, normalized caption,
keyword terms, metadata objects, and its duplicate cluster (its own key and size 1 when it has
no assignment). Counting is a ``Counter`` per batch whose items are summed per term
(``CombinePerKey``), so a term travels once per batch, not once per caption; captions are
grouped (template skeletons here; exact text and MinHash bands in ``trigger_captions``)
through hash buckets of lists.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import apache_beam as beam

from pipeline import progress
from transforms.key_batches import grouped, split_buckets
from transforms.keywords import KeywordExtractor, normalize_caption
from transforms.objects import metadata_objects

CHUNK = 4096  # records per element


INFO_COLUMNS = ("key", "shard", "caption", "meta_json")
NORM_CACHE = 100_000  # distinct captions whose normalized text is kept


def make_record(info, assignment, extractor, use_metadata: bool, norm: str | None = None) -> dict:
    """A SampleInfo (or an object with its key, shard, caption, meta_json) -> a record."""
    return {
        "key": info.key,
        "shard": info.shard,
        "caption": info.caption,
        "norm": normalize_caption(info.caption) if norm is None else norm,
        "terms": extractor.terms_tuple(info.caption),
        "objects": metadata_objects(info.meta_json) if use_metadata else [],
        "cluster_id": assignment.cluster_id if assignment else info.key,
        "cluster_size": assignment.cluster_size if assignment else 1,
    }


class _Row:
    """The info columns records need, for ``make_record`` (no SampleInfo per row)."""

    __slots__ = INFO_COLUMNS

    def __init__(self, key, shard, caption, meta_json):
        self.key, self.shard, self.caption, self.meta_json = key, shard, caption, meta_json


def info_rows(table) -> Iterator[_Row]:
    """An info batch -> its rows' key, shard, caption and meta_json, read column by column."""
    yield from map(_Row, *(table.column(c).to_pylist() for c in INFO_COLUMNS))


class ShardRecordsFn(beam.DoFn):
    """(shard, {"info": info tables, "a": ClusterAssignment}) -> lists of records (<= CHUNK)."""

    def __init__(self, bigrams: bool, use_metadata: bool):
        self.bigrams = bigrams
        self.use_metadata = use_metadata

    def setup(self):
        self.extractor = KeywordExtractor(self.bigrams)
        self.norms: dict[str, str] = {}

    def _norm(self, caption: str) -> str:
        norm = self.norms.get(caption)
        if norm is None:
            norm = normalize_caption(caption)
            if len(self.norms) < NORM_CACHE:
                self.norms[caption] = norm
        return norm

    def process(self, item) -> Iterator[list[dict]]:
        _, joined = item
        assigned = {a.key: a for a in joined["a"]}
        seen: set[str] = set()
        batch: list[dict] = []
        for table in joined["info"]:
            for info in info_rows(table):
                if info.key in seen:  # a key repeated in one shard: its first record
                    continue
                seen.add(info.key)
                norm = self._norm(info.caption)
                batch.append(make_record(info, assigned.get(info.key), self.extractor, self.use_metadata, norm))
                if len(batch) >= CHUNK:
                    progress.advance("triggers", len(batch))
                    yield batch
                    batch = []
        if batch:
            progress.advance("triggers", len(batch))
            yield batch


def bucketed(batch: list[dict], pairs: Callable[[dict], Iterable[tuple]], n: int) -> Iterator[tuple[int, list]]:
    """A batch's records -> (bucket, [(group key, member)]) lists, for grouping by group key."""
    yield from split_buckets((p for r in batch for p in pairs(r)), n)


def per_group(item, group_fn: Callable) -> Iterator:
    """(bucket, lists of (group key, member)) -> group_fn((group key, members)) for each group."""
    _, lists = item
    for group, members in sorted(grouped(lists).items()):
        yield from group_fn((group, members))


def _bucketed_with(batch: list[dict], side, pairs: Callable, n: int) -> Iterator[tuple[int, list]]:
    return bucketed(batch, lambda r: pairs(r, side), n)


class GroupInBuckets(beam.PTransform):
    """Record batches -> fn((group key, members)) per group key, the members gathered through
    ``n`` hash buckets of lists (``pairs(record)`` gives a record's (group key, member) pairs)."""

    def __init__(self, pairs: Callable, fn: Callable, n: int, side=None):
        super().__init__()
        self.pairs, self.fn, self.n, self.side = pairs, fn, n, side

    def expand(self, batches):
        if self.side is None:
            split = batches | "Split" >> beam.FlatMap(bucketed, pairs=self.pairs, n=self.n)
        else:  # pairs(record, side value): e.g. the frequent words for template skeletons
            split = batches | "Split" >> beam.FlatMap(_bucketed_with, pairs=self.pairs, side=self.side, n=self.n)
        return split | "Group" >> beam.GroupByKey() | "PerGroup" >> beam.FlatMap(per_group, group_fn=self.fn)
