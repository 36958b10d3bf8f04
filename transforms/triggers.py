"""MineTriggers: caption duplication, keyword -> cluster and keyword -> object triggers, in Beam.

Counting uses Beam's combiners (``Count.PerElement``) and prunes rare terms before anything is
gathered; only the pruned candidate tables (keywords with support, pairs with support) reach a
single worker for the Benjamini-Hochberg step, which needs every p-value of the family.
Per-sample trigger codes go back to the annotations by key.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterator
from itertools import chain

import apache_beam as beam

from pipeline import progress
from transforms.captions import cluster_duplication
from transforms.keywords import KeywordExtractor, normalize_caption
from transforms.objects import DEFAULT_OBJECTS, DEFAULT_RELATED, metadata_objects, related_fn
from transforms.trigger_captions import CaptionCodes, TemplateCodes, near_norms
from transforms.trigger_records import CHUNK, ShardRecordsFn
from transforms.trigger_stats import keyword_cluster_rows, keyword_object_rows


class _SampleRecords(beam.DoFn):
    """(key, {"i": [SampleInfo], "a": [ClusterAssignment]}) -> one record dict per ok sample."""

    def __init__(self, bigrams: bool, use_metadata: bool):
        self.bigrams = bigrams
        self.use_metadata = use_metadata

    def setup(self):
        self.extractor = KeywordExtractor(self.bigrams)

    def process(self, item) -> Iterator[dict]:
        key, grouped = item
        infos = sorted(grouped["i"], key=lambda i: i.shard)
        if not infos:
            return
        info, assignments = infos[0], list(grouped["a"])
        a = assignments[0] if assignments else None
        progress.advance("triggers")
        yield {
            "key": key,
            "shard": info.shard,
            "caption": info.caption,
            "norm": normalize_caption(info.caption),
            "terms": self.extractor.terms_tuple(info.caption),
            "objects": metadata_objects(info.meta_json) if self.use_metadata else [],
            "cluster_id": a.cluster_id if a else key,
            "cluster_size": a.cluster_size if a else 1,
        }


def _words(record: dict) -> set[str]:
    return set(record["norm"].split()) | set(record["terms"])


def _mentions(record: dict, obj: str, words: set[str] | None = None) -> bool:
    words = _words(record) if words is None else words
    return all(w in words for w in obj.split())


def _object_events(record: dict, vocabulary: frozenset[str]) -> Iterator[tuple]:
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


def _object_event_counts(batch: list[dict], vocabulary: frozenset[str]):
    """A batch's ``_object_events``, counted. A record without metadata objects only mentions
    objects: those whose words it has, found through an index of the vocabulary's words."""
    index = _object_index(vocabulary)
    counts: Counter = Counter()
    for r in batch:
        if r["objects"]:
            counts.update(_object_events(r, vocabulary))
            continue
        words = _words(r)
        hits = {obj for w in words.intersection(index) for obj, parts in index[w] if all(p in words for p in parts)}
        for obj in sorted(hits):
            counts[("mention", obj)] += 1
            counts.update([("kw_mention", w, obj) for w in r["terms"]])
    return counts.items()


@functools.lru_cache(maxsize=256)
def _object_index(objects: frozenset[str]) -> dict[str, tuple[tuple[str, tuple[str, ...]], ...]]:
    """word -> the objects (with their words) that contain it."""
    index: dict[str, list] = {}
    for obj, parts in _split_objects(objects):
        for w in set(parts):
            index.setdefault(w, []).append((obj, parts))
    return {w: tuple(v) for w, v in index.items()}


@functools.lru_cache(maxsize=256)
def _split_objects(objects: frozenset[str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Objects in sorted order with their words, once per object set."""
    return tuple((obj, tuple(obj.split())) for obj in sorted(objects))


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


def _codes_for(record: dict, word_sig, object_sig) -> Iterator[tuple[str, tuple[str, ...]]]:
    codes = [f"word_trigger:{w}" for w in record["terms"] if (w, record["cluster_id"]) in word_sig]
    present = set(record["objects"])
    for w in record["terms"]:
        for o, relation in sorted(object_sig.get(w, ())):
            if o in present and not _mentions(record, o):
                # unintended associations are acted on; implicit intended ones are only recorded
                codes.append(f"{'object_trigger' if relation == 'unintended' else 'implicit_object'}:{w}->{o}")
    if codes:
        yield (record["key"], record["shard"]), tuple(sorted(codes))


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


def _term_counts(batch: list[dict]):
    """A batch's (term, captions with it) counts."""
    return Counter(chain.from_iterable(r["terms"] for r in batch)).items()


def _pair_counts(batch: list[dict], m: int):
    """A batch's ((term, cluster, cluster size), count) over records in clusters of >= m."""
    return Counter(
        (w, r["cluster_id"], r["cluster_size"]) for r in batch if r["cluster_size"] >= m for w in r["terms"]
    ).items()


def _word_counts(batch: list[dict]):
    """A batch's (word, captions with it) counts over normalized captions."""
    return Counter(chain.from_iterable(set(r["norm"].split()) for r in batch)).items()


def _batch_codes(batch: list[dict], ws, os_) -> Iterator:
    word_sig, object_sig = set(ws), _by_keyword(os_)
    for r in batch:
        yield from _codes_for(r, word_sig, object_sig)


def _clustered_captions(batch: list[dict]) -> list[tuple[str, str]]:
    return [(r["cluster_id"], r["caption"]) for r in batch if r["cluster_size"] > 1]


def _chunks(item) -> Iterator[list[dict]]:
    _, records = item
    records = sorted(records, key=lambda r: r["key"])
    for i in range(0, len(records), CHUNK):
        yield records[i : i + CHUNK]


class MineTriggers(beam.PTransform):
    """{"info_batches": SampleInfo tables (or "infos": SampleInfo elements), "assignments":
    ClusterAssignment (of clustered keys; a key without one is a cluster of one)} ->
    {"keywords", "objects", "codes": ((key, shard), tuple of codes), "duplication": (cluster_id,
    dict with "class")}. Records travel as batches (``transforms.trigger_records``)."""

    def __init__(self, cfg, buckets: int = 16):
        super().__init__()
        self.cfg = cfg
        self.buckets = buckets

    def expand(self, inputs):
        cfg = self.cfg
        recs = self._records(inputs)
        n_total = recs | "BatchSizes" >> beam.Map(len) | "CountSamples" >> beam.CombineGlobally(sum)
        kw_counts = (
            recs
            | "Terms" >> beam.FlatMap(_term_counts)
            | "CountTerms" >> beam.CombinePerKey(sum)
            | "PruneTerms" >> beam.Filter(lambda kv, m: kv[1] >= m, m=cfg.min_keyword_count)
        )
        keywords = self._keyword_triggers(recs, kw_counts, n_total)
        objects = self._object_triggers(recs, kw_counts, n_total)
        word_sig = keywords | "WordSig" >> beam.Map(lambda r: (r["keyword"], r["cluster_id"]))
        object_sig = objects | "ObjectSig" >> beam.Map(lambda r: (r["keyword"], (r["object"], r["relation"])))
        trigger_codes = recs | "TriggerCodes" >> beam.FlatMap(
            _batch_codes, ws=beam.pvalue.AsList(word_sig), os_=beam.pvalue.AsList(object_sig)
        )
        codes = (trigger_codes, *self._caption_codes(recs)) | "AllCodes" >> beam.Flatten()
        duplication = (
            recs
            | "CaptionByCluster" >> beam.FlatMap(_clustered_captions)
            | "GroupClusterCaptions" >> beam.GroupByKey()
            | "ClassifyCluster"
            >> beam.Map(
                lambda kv, share: (kv[0], cluster_duplication(list(kv[1]), share)), share=cfg.full_duplication_share
            )
        )
        return {"keywords": keywords, "objects": objects, "codes": codes, "duplication": duplication}

    def _records(self, inputs):
        """-> batches (lists) of records, per shard."""
        use_meta = self.cfg.object_source in ("auto", "metadata")
        if "info_batches" in inputs:
            from schemas import arrow

            keyed = {
                "info": inputs["info_batches"] | "InfoByShard" >> beam.Map(lambda t: (arrow.batch_shard(t), t)),
                "a": inputs["assignments"] | "AssignByShard" >> beam.Map(lambda a: (a.shard, a)),
            }
            joined = keyed | "JoinShard" >> beam.CoGroupByKey()
            return joined | "Records" >> beam.ParDo(ShardRecordsFn(self.cfg.bigrams, use_meta))
        keyed_i = inputs["infos"] | "KeyInfos" >> beam.Map(lambda i: (i.key, i))
        keyed_a = inputs["assignments"] | "KeyAssign" >> beam.Map(lambda a: (a.key, a))
        return (
            {"i": keyed_i, "a": keyed_a}
            | "JoinSample" >> beam.CoGroupByKey()
            | "Records" >> beam.ParDo(_SampleRecords(self.cfg.bigrams, use_meta))
            | "ByShard" >> beam.Map(lambda r: (r["shard"], r))
            | "GroupShard" >> beam.GroupByKey()
            | "Batches" >> beam.FlatMap(_chunks)
        )

    def _keyword_triggers(self, recs, kw_counts, n_total):
        cfg = self.cfg
        pairs = (
            recs
            | "Pairs" >> beam.FlatMap(_pair_counts, m=cfg.min_pair_count)
            | "CountPairs" >> beam.CombinePerKey(sum)
            | "PrunePairs" >> beam.Filter(lambda kv, m: kv[1] >= m, m=cfg.min_pair_count)
        )
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

    def _object_triggers(self, recs, kw_counts, n_total):
        cfg = self.cfg
        if cfg.object_source == "none":
            return recs.pipeline | "NoObjects" >> beam.Create([])
        vocabulary = frozenset(cfg.objects or DEFAULT_OBJECTS)
        events = (
            recs
            | "ObjectEvents" >> beam.FlatMap(_object_event_counts, vocabulary=vocabulary)
            | "CountEvents" >> beam.CombinePerKey(sum)
        )
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

    def _caption_codes(self, recs):
        cfg, n = self.cfg, self.buckets
        out = [recs | "DuplicateCaptions" >> CaptionCodes(cfg.near_duplicate_captions, n)]
        frequent = (
            recs
            | "Words" >> beam.FlatMap(_word_counts)
            | "CountWords" >> beam.CombinePerKey(sum)
            | "Frequent" >> beam.Filter(lambda kv, m: kv[1] >= m, m=cfg.template_min_df)
            | "FrequentWords" >> beam.Keys()
        )
        templates = TemplateCodes(_as_set(frequent), n, cfg.template_min_count, cfg.template_min_distinct)
        out.append(recs | "Skeletons" >> templates)
        return out


def _as_set(pcoll):
    return beam.pvalue.AsSingleton(
        pcoll | "FrequentSet" >> beam.combiners.ToList() | "ToFrozenset" >> beam.Map(frozenset)
    )


def _by_keyword(pairs) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for w, o in pairs:
        out.setdefault(w, set()).add(o)
    return out
