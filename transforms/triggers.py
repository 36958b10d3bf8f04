"""MineTriggers: caption duplication, keyword -> cluster and keyword -> object triggers, in Beam.

Counting uses Beam's combiners (``Count.PerElement``) and prunes rare terms before anything is
gathered; only the pruned candidate tables (keywords with support, pairs with support) reach a
single worker for the Benjamini-Hochberg step, which needs every p-value of the family.
Per-sample trigger codes go back to the annotations by key.
"""

from __future__ import annotations

from collections.abc import Iterator

import apache_beam as beam

from pipeline import progress
from transforms.captions import cluster_duplication, minhash_bands, skeleton
from transforms.keywords import KeywordExtractor, normalize_caption
from transforms.objects import DEFAULT_OBJECTS, DEFAULT_RELATED, metadata_objects, related_fn
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
            "terms": self.extractor.terms(info.caption),
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
    for obj in sorted(vocabulary | present):
        if _mentions(record, obj, words):
            yield ("mention", obj)
            for w in record["terms"]:
                yield ("kw_mention", w, obj)
        elif obj in present:
            yield ("object", obj)
            for w in record["terms"]:
                yield ("both", w, obj)


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


def _group_codes(item, code: str, min_members: int = 2, min_clusters: int = 2) -> Iterator:
    _, members = item
    members = list(members)
    if len(members) >= min_members and len({c for _, c in members}) >= min_clusters:
        for key, _ in members:
            yield key, (code,)


def _near_dup_keys(item) -> Iterator:
    from transforms.captions import jaccard

    _, members = item
    members = sorted(set(members))
    if len(members) < 2 or len(members) > 200:  # a huge bucket is an exact-template flood
        return
    sets = [frozenset(n.split()) for _, n in members]
    for i, (ka, na) in enumerate(members):
        for j in range(i + 1, len(members)):
            kb, nb = members[j]
            if na != nb and jaccard(sets[i], sets[j]) >= 0.8:
                yield ka, ("near_duplicate_caption",)
                yield kb, ("near_duplicate_caption",)


def _template_keys(item, min_count: int, min_distinct: int) -> Iterator:
    _, members = item
    members = list(members)
    if len(members) >= min_count and len({n for _, n in members}) >= min_distinct:
        for key, _ in members:
            yield key, ("template_caption",)


class MineTriggers(beam.PTransform):
    """{"infos": SampleInfo, "assignments": ClusterAssignment (of clustered keys; a key without
    one is a cluster of one)} -> {"keywords", "objects", "codes": ((key, shard), tuple of codes),
    "duplication": (cluster_id, dict with "class")}."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg

    def expand(self, inputs):
        cfg = self.cfg
        recs = self._records(inputs)
        n_total = recs | "CountSamples" >> beam.combiners.Count.Globally()
        kw_counts = (
            recs
            | "Terms" >> beam.FlatMap(lambda r: r["terms"])
            | "CountTerms" >> beam.combiners.Count.PerElement()
            | "PruneTerms" >> beam.Filter(lambda kv, m: kv[1] >= m, m=cfg.min_keyword_count)
        )
        keywords = self._keyword_triggers(recs, kw_counts, n_total)
        objects = self._object_triggers(recs, kw_counts, n_total)
        word_sig = keywords | "WordSig" >> beam.Map(lambda r: (r["keyword"], r["cluster_id"]))
        object_sig = objects | "ObjectSig" >> beam.Map(lambda r: (r["keyword"], (r["object"], r["relation"])))
        trigger_codes = recs | "TriggerCodes" >> beam.FlatMap(
            lambda r, ws, os_: _codes_for(r, set(ws), _by_keyword(os_)),
            ws=beam.pvalue.AsList(word_sig),
            os_=beam.pvalue.AsList(object_sig),
        )
        codes = (trigger_codes, *self._caption_codes(recs)) | "AllCodes" >> beam.Flatten()
        duplication = (
            recs
            | "InClusters" >> beam.Filter(lambda r: r["cluster_size"] > 1)
            | "CaptionByCluster" >> beam.Map(lambda r: (r["cluster_id"], r["caption"]))
            | "GroupClusterCaptions" >> beam.GroupByKey()
            | "ClassifyCluster"
            >> beam.Map(
                lambda kv, share: (kv[0], cluster_duplication(list(kv[1]), share)), share=cfg.full_duplication_share
            )
        )
        return {"keywords": keywords, "objects": objects, "codes": codes, "duplication": duplication}

    def _records(self, inputs):
        keyed_i = inputs["infos"] | "KeyInfos" >> beam.Map(lambda i: (i.key, i))
        keyed_a = inputs["assignments"] | "KeyAssign" >> beam.Map(lambda a: (a.key, a))
        use_meta = self.cfg.object_source in ("auto", "metadata")
        return (
            {"i": keyed_i, "a": keyed_a}
            | "JoinSample" >> beam.CoGroupByKey()
            | "Records" >> beam.ParDo(_SampleRecords(self.cfg.bigrams, use_meta))
        )

    def _keyword_triggers(self, recs, kw_counts, n_total):
        cfg = self.cfg
        pairs = (
            recs
            | "BigClusters" >> beam.Filter(lambda r, m: r["cluster_size"] >= m, m=cfg.min_pair_count)
            | "Pairs" >> beam.FlatMap(lambda r: [(w, r["cluster_id"], r["cluster_size"]) for w in r["terms"]])
            | "CountPairs" >> beam.combiners.Count.PerElement()
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
            | "ObjectEvents" >> beam.FlatMap(_object_events, vocabulary=vocabulary)
            | "CountEvents" >> beam.combiners.Count.PerElement()
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
        cfg = self.cfg
        exact = (
            recs
            | "ByCaption" >> beam.Map(lambda r: (r["norm"], ((r["key"], r["shard"]), r["cluster_id"])))
            | "GroupCaption" >> beam.GroupByKey()
            | "DuplicateCaptions" >> beam.FlatMap(_group_codes, code="duplicate_caption")
        )
        out = [exact]
        if cfg.near_duplicate_captions:
            out.append(
                recs
                | "Bands" >> beam.FlatMap(_bands)
                | "GroupBands" >> beam.GroupByKey()
                | "NearPairs" >> beam.FlatMap(_near_dup_keys)
                | "DistinctNear" >> beam.Distinct()
            )
        frequent = (
            recs
            | "Words" >> beam.FlatMap(lambda r: sorted(set(r["norm"].split())))
            | "CountWords" >> beam.combiners.Count.PerElement()
            | "Frequent" >> beam.Filter(lambda kv, m: kv[1] >= m, m=cfg.template_min_df)
            | "FrequentWords" >> beam.Keys()
        )
        out.append(
            recs
            | "Skeletons"
            >> beam.FlatMap(
                lambda r, fw: [(sk, ((r["key"], r["shard"]), r["norm"]))] if (sk := skeleton(r["caption"], fw)) else [],
                fw=_as_set(frequent),
            )
            | "GroupSkeleton" >> beam.GroupByKey()
            | "Templates"
            >> beam.FlatMap(_template_keys, min_count=cfg.template_min_count, min_distinct=cfg.template_min_distinct)
        )
        return out


def _bands(r: dict) -> list[tuple]:
    return [(b, ((r["key"], r["shard"]), r["norm"])) for b in minhash_bands(r["caption"])]


def _as_set(pcoll):
    return beam.pvalue.AsSingleton(
        pcoll | "FrequentSet" >> beam.combiners.ToList() | "ToFrozenset" >> beam.Map(frozenset)
    )


def _by_keyword(pairs) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for w, o in pairs:
        out.setdefault(w, set()).add(o)
    return out
