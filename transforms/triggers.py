"""MineTriggers: caption duplication, keyword -> cluster and keyword -> object triggers, in Beam.

Counting uses Beam's combiners (``Count.PerElement``) and prunes rare terms before anything is
gathered; only the pruned candidate tables (keywords with support, pairs with support) reach a
single worker for the Benjamini-Hochberg step, which needs every p-value of the family.
Per-sample trigger codes go back to the annotations by key.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from itertools import chain

import apache_beam as beam

from transforms.key_batches import grouped
from transforms.objects import DEFAULT_OBJECTS, DEFAULT_RELATED, related_fn
from transforms.shard_columns import Batch, BatchByShard
from transforms.trigger_bundle import BundleCounts
from transforms.trigger_captions import CaptionCodes, CaptionGroups, TemplateCodes, caption_codes, near_norms
from transforms.trigger_clusters import classified_columns, member_columns
from transforms.trigger_counts import (
    EVENTS,
    batch_codes,
    cluster_pair_counts,
    code_rows,
    norm_duplication,
)
from transforms.trigger_join import ClusterRecordsFn, join_part
from transforms.trigger_records import INFO_COLUMNS, CaptionRecordsFn, column
from transforms.trigger_samples import sample_records
from transforms.trigger_stats import keyword_cluster_rows, keyword_object_rows


def _info_by_shard(table) -> tuple:
    """An info batch -> (its shard, only the columns records read): the rest stay out of the join."""
    from schemas import arrow

    return arrow.batch_shard(table), table.select(list(INFO_COLUMNS)) if table.num_rows else table


def _object_candidates(both, counts, kw_counts, n_total, min_keyword) -> list[dict]:
    out = []
    for (_, w, obj), n_both in both:
        n_total_o = n_total - counts.get(("mention", obj), 0)
        n_keyword = kw_counts.get(w, 0) - counts.get(("kw_mention", w, obj), 0)
        if n_keyword >= min_keyword and n_total_o > 0:
            out.append(
                {
                    "keyword": w,
                    "object": obj,
                    "n_total": n_total_o,
                    "n_keyword": n_keyword,
                    "n_object": counts.get(("object", obj), 0),
                    "n_both": n_both,
                }
            )
    return sorted(out, key=lambda r: (r["keyword"], r["object"]))


def _near_dup_keys(item) -> Iterator:
    """(band, [(member id, normalized caption)]) -> (member id, code) for members whose caption
    is a near duplicate (Jaccard >= 0.8, not equal) of another's; distinct captions are compared
    once, whatever number of members share each. The per-record reference of
    ``transforms.trigger_captions`` (which sends distinct captions only)."""
    _, members = item
    members = sorted(set(members))
    if len(members) < 2 or len(members) > 200:  # a huge bucket is an exact-template flood
        return
    by_norm: dict[str, list] = {}
    for key, norm in members:
        by_norm.setdefault(norm, []).append(key)
    norms = sorted(by_norm)
    for norm in sorted(_near_norms(norms)):
        for key in by_norm[norm]:
            yield key, ("near_duplicate_caption",)


def _near_norms(norms: list[str]) -> set[str]:
    return near_norms(norms)


def _word_counts(batch: list[dict]):
    """A batch's (word, captions with it) counts over normalized captions (the reference of
    ``trigger_counts.word_counts``)."""
    return Counter(chain.from_iterable(set(norm.split()) for norm in column(batch, "norm"))).items()


class CountBatches(beam.DoFn):
    """Record batches -> their ``batch_counts`` (words included; (term, cluster) pairs only of
    clusters of one: the others are counted per cluster, ``classified``) summed over the
    bundle (``trigger_bundle.BundleCounts``): one (key, count) element per key and bundle
    (flushed at ``FLUSH`` keys), not per key and batch, so the combine after it sees a few
    elements per key."""

    FLUSH = 200_000

    def __init__(self, m: int, vocabulary):
        self.m, self.vocabulary = m, vocabulary

    def start_bundle(self):
        self.counts = BundleCounts(self.m, self.vocabulary)

    def process(self, batch) -> Iterator[tuple]:
        self.counts.add(batch)
        if len(self.counts) >= self.FLUSH:
            counts, self.counts = self.counts, BundleCounts(self.m, self.vocabulary)
            yield from counts.items()

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindow
        from apache_beam.utils.windowed_value import WindowedValue

        counts, self.counts = self.counts, BundleCounts(self.m, self.vocabulary)
        for kv in counts.items():
            yield WindowedValue(kv, 0, [GlobalWindow()])


def _tagged(kv, tag: str, m: int = 0) -> list:
    """A count of ``batch_counts`` -> (its key less the tag, count) when it has the tag and
    reaches m: ("n",) -> the count alone; ("t", term) -> term; ("w", word) -> word; ("p",
    term, cluster, size) -> (term, cluster, size)."""
    key, n = kv
    if key[0] != tag or n < m:
        return []
    if tag == "n":
        return [n]
    return [(key[1] if tag in ("t", "w") else key[1:], n)]


def _batch_codes(batch, ws, os_) -> Iterator[tuple[str, list]]:
    """A batch's trigger codes as (shard, Batch of (key, codes)): one element per shard of the
    batch, as ``shard_stage.AnnotateShards`` takes them."""
    by_shard: dict[str, Batch] = {}
    for (key, shard), codes in batch_codes(batch, _by_keyword(ws), _by_keyword(os_)):
        by_shard.setdefault(shard, Batch()).append((key, codes))
    yield from sorted(by_shard.items())


class CodesByShard(BatchByShard):
    """((key, shard), codes) per record -> (shard, Batch of (key, codes)) per shard and bundle;
    elements already (shard, Batch) pass as they are (a caption stage that batches its codes)."""

    def process(self, kv):
        """One call per coded record: a plain function (no generator) that returns nothing (an empty
        tuple: Beam warns on None) unless a shard's batch is full (the key and shard split here:
        the base class's ``route`` is not used)."""
        if isinstance(kv[1], Batch):
            return [kv]
        (key, shard), codes = kv
        batch = self.held.get(shard)
        if batch is None:
            batch = self.held[shard] = Batch()
        batch.append((key, codes))
        if len(batch) >= self.size:
            return [(shard, self.held.pop(shard))]
        return ()


def classified(item, share: float, m: int) -> Iterator:
    """(bucket, lists of ``clustered_members``) -> (cluster id, its ``cluster_duplication``) per
    cluster; tagged "rows", (shard, Batch of (key, (cluster id, class))) per shard of the
    bucket's members (the classes reach the members' shards without a join on the cluster id);
    tagged "pairs", the (term, cluster) pairs on >= m records (``cluster_pair_counts``). The
    per-member reference of ``trigger_clusters.classified_columns``, which the graph runs."""
    _, lists = item
    rows: dict[str, Batch] = {}
    for cluster, members in sorted(grouped(lists).items()):
        found = norm_duplication([r[0] for r in members], share)
        yield cluster, found
        for kv in cluster_pair_counts(cluster, members, m):
            yield beam.pvalue.TaggedOutput("pairs", kv)
        for _, key, shard, _, _ in members:
            rows.setdefault(shard, Batch()).append((key, (cluster, found["class"])))
    for shard, batch in sorted(rows.items()):
        yield beam.pvalue.TaggedOutput("rows", (shard, batch))


class MineTriggers(beam.PTransform):
    """{"info_batches": SampleInfo tables (or "infos": SampleInfo elements), "assignments":
    ClusterAssignment (of clustered keys; a key without one is a cluster of one), or with info
    tables "assignment_rows": (shard, [assignment tuples]) as ``assignment_rows`` gives} ->
    {"keywords", "objects", "codes": (shard, ``shard_columns.Batch`` of (key, tuple of codes)),
    "duplication": (cluster_id, dict with "class"), "duplication_rows": (shard, Batch of (key,
    (cluster_id, class))) for the members of clusters of more than one}. Records travel as batches
    (``transforms.trigger_records``), and so do the codes: a key may have codes in several of
    its shard's batches (word triggers, caption kinds), which the per-shard stage merges.

    From info tables, what needs no cluster runs as soon as the reader has the tables, after a
    shuffle by shard of its own (``_records``): caption records, counts (but clusters of one's
    pairs at ``min_pair_count`` 1), template skeletons, near-duplicate captions; the shard join
    with the assignments then adds the clusters (``transforms.trigger_join``)."""

    def __init__(self, cfg, buckets: int = 16):
        super().__init__()
        self.cfg = cfg
        self.buckets = buckets

    def expand(self, inputs):
        cfg, m = self.cfg, self.cfg.min_pair_count
        recs, captions, by_caption = self._records(inputs)
        vocabulary = None if cfg.object_source == "none" else frozenset(cfg.objects or DEFAULT_OBJECTS)
        # one combine for every count: records, terms, object events, words, small-cluster pairs;
        # pairs of clusters of one count only for m = 1: for m >= 2 no count needs a cluster
        counted = captions if m >= 2 else recs
        counts = counted | "Counts" >> beam.ParDo(CountBatches(m, vocabulary)) | "CountAll" >> beam.CombinePerKey(sum)
        n_total = counts | "BatchSizes" >> beam.FlatMap(_tagged, tag="n") | "CountSamples" >> beam.CombineGlobally(sum)
        kw_counts = counts | "PruneTerms" >> beam.FlatMap(_tagged, tag="t", m=cfg.min_keyword_count)
        duplication = (
            recs  # member columns in hash buckets of cluster ids: no element per record
            | "CaptionByCluster" >> beam.FlatMap(member_columns, m=m, n=self.buckets)
            | "GroupClusterCaptions" >> beam.GroupByKey()
            | "ClassifyCluster"
            >> beam.FlatMap(classified_columns, share=cfg.full_duplication_share, m=m).with_outputs(
                "rows", "pairs", main="classes"
            )
        )
        small_pairs = counts | "PrunePairs" >> beam.FlatMap(_tagged, tag="p", m=m)  # clusters of one (m = 1)
        pairs = (duplication.pairs, small_pairs) | "AllPairs" >> beam.Flatten()
        keywords = self._keyword_triggers(pairs, kw_counts, n_total)
        objects = self._object_triggers(counts, vocabulary, kw_counts, n_total)
        by_caption["TemplateCodes"] = self._template_codes(captions, counts)
        return {
            "keywords": keywords,
            "objects": objects,
            "codes": self._codes(recs, by_caption, keywords, objects),
            "duplication": duplication.classes,
            "duplication_rows": duplication.rows,
        }

    def _codes(self, recs, by_caption: dict, keywords, objects):
        """-> (shard, Batch of (key, codes)): trigger codes per batch, caption codes batched."""
        word_sig = keywords | "WordSig" >> beam.Map(lambda r: (r["keyword"], r["cluster_id"]))
        object_sig = objects | "ObjectSig" >> beam.Map(lambda r: (r["keyword"], (r["object"], r["relation"])))
        trigger_codes = (
            recs
            | "CodeRows" >> beam.FlatMap(code_rows, m=self.cfg.min_pair_count)
            | "TriggerCodes"
            >> beam.FlatMap(_batch_codes, ws=beam.pvalue.AsList(word_sig), os_=beam.pvalue.AsList(object_sig))
        )
        # each caption branch batches its per-record codes by shard in the stage that makes them
        # (fused): a Flatten of per-record elements would cross the data plane one by one
        batched = tuple(codes | f"{name}ByShard" >> beam.ParDo(CodesByShard()) for name, codes in by_caption.items())
        return (trigger_codes, *batched) | "AllCodes" >> beam.Flatten()

    def _records(self, inputs):
        """-> (record batches, the same records as clusters of one: what the counts and the
        caption stages read, {name: caption codes}). From info tables, the second are made per
        shard (``CaptionRecordsFn``) after a shuffle of their own, as soon as the reader has them:
        not in the reader's stage, and not after the duplicate search; the caption stages run
        on them (``CaptionGroups``); the shard join then adds the clusters, to the records and
        to the few records whose caption another record has (duplicate captions need them)."""
        cfg, n = self.cfg, self.buckets
        use_meta = cfg.object_source in ("auto", "metadata")
        if "info_batches" not in inputs:
            recs = sample_records(inputs, cfg.bigrams, use_meta)
            return (
                recs,
                recs,
                {"DuplicateCodes": recs | "DuplicateCaptions" >> CaptionCodes(cfg.near_duplicate_captions, n)},
            )
        if "assignment_rows" in inputs:  # (shard, [assignment tuples]): no element per key
            by_shard = inputs["assignment_rows"]
        else:
            by_shard = inputs["assignments"] | "AssignByShard" >> beam.Map(lambda a: (a.shard, a))
        parts = (  # (shard, (row start, RecordBatch))
            inputs["info_batches"]
            | "InfoByShard" >> beam.Map(_info_by_shard)
            | "GroupInfos" >> beam.GroupByKey()
            | "Captions" >> beam.ParDo(CaptionRecordsFn(cfg.bigrams, use_meta))
        )
        captions = parts | "CaptionBatches" >> beam.Map(lambda kv: kv[1][1])
        groups = captions | "DuplicateCaptions" >> CaptionGroups(cfg.near_duplicate_captions, n)
        lean = parts | "JoinParts" >> beam.Map(join_part)
        joined = {"part": lean, "a": by_shard, "shared": groups["shared"]} | "JoinShard" >> beam.CoGroupByKey()
        every_row = cfg.min_pair_count <= 1  # else only clustered rows and rows with objects need a cluster
        records = ClusterRecordsFn(n, every_row)
        recs = joined | "Records" >> beam.ParDo(records).with_outputs("shared", main="records")
        duplicates = recs.shared | "GroupShared" >> beam.GroupByKey() | "SharedCodes" >> beam.FlatMap(caption_codes)
        return recs.records, captions, {"NearCodes": groups["near"], "DuplicateCodes": duplicates}

    def _keyword_triggers(self, pairs, kw_counts, n_total):
        cfg = self.cfg
        candidates = pairs | "Candidates" >> beam.FlatMap(
            lambda kv, counts: (
                [
                    {
                        "keyword": kv[0][0],
                        "cluster_id": kv[0][1],
                        "n_cluster": kv[0][2],
                        "n_keyword": counts[kv[0][0]],
                        "n_both": kv[1],
                    }
                ]
                if kv[0][0] in counts
                else []
            ),
            counts=beam.pvalue.AsDict(kw_counts),
        )
        return (
            candidates
            | "GatherCandidates" >> beam.combiners.ToList()
            | "TestKeywords"
            >> beam.FlatMap(
                lambda rows, n: keyword_cluster_rows(
                    sorted(rows, key=lambda r: (r["keyword"], r["cluster_id"])), n, cfg
                ),
                n=beam.pvalue.AsSingleton(n_total),
            )
        )

    def _object_triggers(self, counts, vocabulary, kw_counts, n_total):
        cfg = self.cfg
        if vocabulary is None:
            return counts.pipeline | "NoObjects" >> beam.Create([])
        events = counts | "ObjectEvents" >> beam.Filter(lambda kv: kv[0][0] in EVENTS)
        both = events | "BothEvents" >> beam.Filter(
            lambda kv, m: kv[0][0] == "both" and kv[1] >= m, m=cfg.min_pair_count
        )
        small = events | "OtherEvents" >> beam.Filter(lambda kv: kv[0][0] in ("mention", "object", "kw_mention"))
        related = related_fn(tuple(DEFAULT_RELATED) + tuple(cfg.related_pairs))
        return (
            both
            | "GatherBoth" >> beam.combiners.ToList()
            | "TestObjects"
            >> beam.FlatMap(
                lambda rows, counts, kws, n: keyword_object_rows(
                    _object_candidates(rows, counts, kws, n, cfg.min_keyword_count), cfg, related
                ),
                counts=beam.pvalue.AsDict(small),
                kws=beam.pvalue.AsDict(kw_counts),
                n=beam.pvalue.AsSingleton(n_total),
            )
            | "ObjectRows"
            >> beam.Map(
                lambda r: {
                    k: r[k]
                    for k in ("keyword", "object", "n_keyword", "n_both", "lift", "p_value", "q_value", "relation")
                }
            )
        )

    def _template_codes(self, captions, counts):
        cfg = self.cfg
        frequent = (  # the words of the normalized captions, counted in the one combine
            counts
            | "Frequent" >> beam.FlatMap(_tagged, tag="w", m=cfg.template_min_df)
            | "FrequentWords" >> beam.Keys()
        )
        templates = TemplateCodes(_as_set(frequent), self.buckets, cfg.template_min_count, cfg.template_min_distinct)
        return captions | "Skeletons" >> templates


def _as_set(pcoll):
    return beam.pvalue.AsSingleton(
        pcoll | "FrequentSet" >> beam.combiners.ToList() | "ToFrozenset" >> beam.Map(frozenset)
    )


def _by_keyword(pairs) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for w, o in pairs:
        out.setdefault(w, set()).add(o)
    return out
