"""The ORB copy embedder on Beam: features per sample, candidates per visual word, verified pairs.

Partitioning (no step gathers all descriptors): features are computed where samples are
decoded (``transforms.process_shards``, cached with the shard); each image's words are shuffled
by word partition (``word_partitions`` ranges of the word space, one element per image and
partition); in each partition every word's posting list (at most ``max_df`` keys, or it is a
stop-word and only its id is kept) votes for key pairs, sent per first key and summed there; each
image keeps its ``max_candidates`` best pairs. Verification takes three keyed joins with the
feature records, so no element ever holds two full records: at the smaller key its matchable
record (kept descriptors and keypoints) goes to the other key, which aligns the pair; the pairs
that align go back with the other's thumbnail and are confirmed photometrically. Per pair ~18 KB
travel, not 2 x ~45 KB (the Flickr shards' peak RSS: 6.7 GB -> 2.4 GB, 1.26 GB without ORB).
See docs/copy_detection.md for the cost at 1e8 images.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator

import apache_beam as beam
import numpy as np

from schemas.elements import Edge, Neighbour
from transforms.local_features import (
    EMBEDDER,
    Alignment,
    Features,
    Verdict,
    align,
    confirm,
    verify,
    vocabulary,
    words,
)

log = logging.getLogger(__name__)


def keep_mask(feat: Features, voc: tuple[int, int], stop: np.ndarray) -> np.ndarray:
    """Descriptors to match: those with at most half of their words stop-words (stop: sorted ids;
    voc: ``vocabulary()``'s tables and word bits)."""
    if len(stop) == 0 or len(feat.desc) == 0:
        return np.ones(len(feat.desc), bool)
    stopped = np.isin(words(feat.desc, *voc), stop, assume_unique=False)
    return stopped.sum(axis=1) * 2 <= voc[0]


def postings(feat: Features, voc: tuple[int, int]) -> np.ndarray:
    return np.unique(words(feat.desc, *voc))


def partition_votes(items: list[tuple[str, np.ndarray]], max_df: int) -> tuple[dict, np.ndarray]:
    """One partition of the word space: (key, its words there) -> ({(key a, key b): votes}, stop words).

    A word held by more than ``max_df`` keys is a stop-word; every other word shared by keys
    votes once for each pair of them."""
    items = sorted(items)
    if not items:
        return {}, np.zeros(0, np.int64)
    keys = [k for k, _ in items]
    word = np.concatenate([w for _, w in items])
    owner = np.concatenate([np.full(len(w), i) for i, (_, w) in enumerate(items)])
    order = np.lexsort((owner, word))
    word, owner = word[order], owner[order]
    starts = np.flatnonzero(np.r_[True, word[1:] != word[:-1]])
    counts = np.diff(np.r_[starts, len(word)])
    stop = word[starts[counts > max_df]]
    votes: dict[tuple[str, str], int] = {}
    live = (counts >= 2) & (counts <= max_df)
    for s, c in zip(starts[live], counts[live], strict=True):
        for a, b in itertools.combinations(owner[s : s + c].tolist(), 2):
            pair = (keys[a], keys[b])
            votes[pair] = votes.get(pair, 0) + 1
    return votes, stop


def candidate_pairs(post: dict[str, np.ndarray], cfg) -> tuple[list[tuple[str, str, int]], np.ndarray]:
    """In memory: key -> its unique words -> ([(key a, key b, votes >= min_votes)], sorted stop words)."""
    votes, stop = partition_votes(list(post.items()), cfg.max_df)
    pairs = [(a, b, v) for (a, b), v in sorted(votes.items()) if v >= cfg.min_votes]
    return pairs, np.sort(stop)


def top_candidates(key: str, scored: list[tuple[int, str]], k: int) -> list[tuple[str, str]]:
    """One key's candidates (votes, other key) -> its ``k`` best as sorted pairs (most votes first,
    then the smaller key): verification, and the features shipped to it, stay O(k) per image."""
    best = sorted(scored, key=lambda vo: (-vo[0], vo[1]))[:k]
    return [(min(key, o), max(key, o)) for _, o in best]


def cap_candidates(pairs: list[tuple[str, str, int]], k: int) -> set[tuple[str, str]]:
    """In memory: the pairs that are among the ``k`` best of either end (as ``FindOrbCopies``)."""
    scored: dict[str, list[tuple[int, str]]] = {}
    for a, b, v in pairs:
        scored.setdefault(a, []).append((v, b))
        scored.setdefault(b, []).append((v, a))
    return {pair for key, sc in scored.items() for pair in top_candidates(key, sc, k)}


def find_orb_pairs(feats: dict[str, Features], cfg, skip: set | None = None) -> list[Edge]:
    """In memory (tests, scripts/eval_copies.py): the same algorithm as ``FindOrbCopies``; a pair
    with both keys in ``skip`` (the hash-matched keys, ``only_unmatched``) is not verified."""
    voc = vocabulary(cfg, len(feats))
    pairs, stop = candidate_pairs({k: postings(f, voc) for k, f in feats.items()}, cfg)
    kept = cap_candidates(pairs, cfg.max_candidates)
    pairs = [p for p in pairs if (p[0], p[1]) in kept]
    masks = {k: keep_mask(f, voc, stop) for k, f in feats.items()}
    edges = []
    for a, b, _ in pairs:
        if skip and a in skip and b in skip:
            continue
        v = verify(feats[a], feats[b], cfg, masks[a], masks[b])
        if v.copy:
            edges.append(Edge(a, b, round(v.agreement, 4), EMBEDDER))
    return edges


# ---- Beam ----


def _postings(item, cfg, n_images: int) -> Iterator:
    """(key, features) -> (partition, (key, its words in that partition)): one element per partition."""
    key, data = item
    voc = vocabulary(cfg, n_images)
    w = postings(Features.from_bytes(data), voc)
    part = w % cfg.word_partitions
    for p in np.unique(part).tolist():
        yield p, (key, w[part == p], voc)


def _partition_pairs(item, max_df: int) -> Iterator:
    """One word partition -> its votes, one element per first key (key a, ([key b], [votes])), and,
    tagged "stop", each key's stop-words there (key, word ids): keyed, so no step holds the
    collection's stop-words."""
    _, items = item
    items = list(items)
    votes, stop = partition_votes([(key, w) for key, w, _ in items], max_df)
    beam.metrics.Metrics.counter(EMBEDDER, "stop_words").inc(len(stop))
    if len(stop):
        for key, w, voc in items:  # the vocabulary travels with them: the image count is read once
            mine = w[np.isin(w, stop)]
            if len(mine):
                yield beam.pvalue.TaggedOutput("stop", (key, (voc, mine)))
    by_first: dict[str, tuple[list, list]] = {}
    for (a, b), n in votes.items():  # a < b: one element per key, not one per pair and partition
        others, counts = by_first.setdefault(a, ([], []))
        others.append(b)
        counts.append(n)
    yield from by_first.items()


def _sum_votes(item, min_votes: int) -> Iterator:
    """At key a: its votes from every word partition -> ((a, b), votes) for the pairs with ``min_votes``."""
    key, parts = item
    total: dict[str, int] = {}
    for others, counts in parts:
        for other, n in zip(others, counts, strict=True):
            total[other] = total.get(other, 0) + n
    for other, v in sorted(total.items()):
        if v >= min_votes:
            yield (key, other), v


def _kept(feat: Features, grouped) -> Features:
    """``feat``'s matchable record, without the descriptors that are mostly its stop-words (which
    arrive from every word partition with the vocabulary they are words of)."""
    got = list(grouped["stop"])
    if not got:
        return matchable(feat, np.ones(len(feat.desc), bool))
    stop = np.sort(np.concatenate([ids for _, ids in got]))
    return matchable(feat, keep_mask(feat, tuple(got[0][0]), stop))


def matchable(feat: Features, keep: np.ndarray) -> Features:
    """What the other end of a pair needs to align with ``feat``: its kept keypoints and
    descriptors, frame size and content box, no thumbnail (~18 KB instead of ~40 KB)."""
    return Features(feat.xy[keep], feat.desc[keep], feat.size, np.zeros((0, 0), np.uint8), feat.content)


def photo_record(feat: Features) -> bytes:
    """What the photometric check needs of one end: frame size, thumbnail, content box."""
    return Features(
        np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8), feat.size, feat.thumb, feat.content
    ).to_bytes()


def _one(grouped, tag: str):
    got = list(grouped[tag])
    return got[0] if got else None


def _ship_matchable(item) -> Iterator:
    """At key a (the smaller key of its pairs): its matchable record once per partner b -> (b, (a, record))."""
    key, grouped = item
    data, partners = _one(grouped, "feat"), sorted(set(grouped["partner"]))
    if data is None or not partners:
        return
    record = _kept(Features.from_bytes(data), grouped).to_bytes()
    for other in partners:
        yield other, (key, record)


def _align_at_b(item, cfg) -> Iterator:
    """At key b: align every partner's matchable record with b's features; the pairs that pass the
    geometric checks go back to a with b's thumbnail -> (a, (b, alignment, b's photo record))."""
    key, grouped = item
    data, records = _one(grouped, "feat"), sorted(grouped["matchable"])
    if data is None or not records:
        return
    fb = _kept(Features.from_bytes(data), grouped)
    photo = None
    for other, record in records:
        al = align(Features.from_bytes(record), fb, cfg)
        if isinstance(al, Verdict):
            beam.metrics.Metrics.counter(EMBEDDER, "rejected").inc()
            continue
        photo = photo or photo_record(Features.from_bytes(data))
        yield other, (key, al.to_bytes(), photo)


def _tag_hash_matched(item) -> Iterator:
    """At key a: its pairs (a, b) -> (b, (a, whether the hash matched a))."""
    key, grouped = item
    matched = bool(list(grouped["matched"]))
    for other in grouped["pair"]:
        yield other, (key, matched)


def _unless_both_hash_matched(item) -> Iterator:
    """At key b: the pairs (a, b) whose a or b the hash left unmatched, as (a, b)."""
    key, grouped = item
    matched = bool(list(grouped["matched"]))
    for other, other_matched in grouped["pair"]:
        if matched and other_matched:
            beam.metrics.Metrics.counter(EMBEDDER, "skipped_hash_matched").inc()
        else:
            yield other, key


class DropHashMatched(beam.PTransform):
    """Pairs (a, b) -> those with a or b outside the hash stage's edges (two joins with the
    matched keys, a few bytes per pair, before any feature record is shipped)."""

    def __init__(self, hash_edges):
        super().__init__()
        self.hash_edges = hash_edges

    def expand(self, pairs):
        matched = (
            self.hash_edges
            | "HashMatchedKeys" >> beam.FlatMap(lambda e: [e.key_a, e.key_b])
            | "OnceEach" >> beam.Distinct()
            | "KeyMatched" >> beam.Map(lambda k: (k, True))
        )
        tagged = {"pair": pairs, "matched": matched} | "AtFirstKey" >> beam.CoGroupByKey()
        second = tagged | "TagFirst" >> beam.FlatMap(_tag_hash_matched)
        at_second = {"pair": second, "matched": matched} | "AtSecondKey" >> beam.CoGroupByKey()
        return at_second | "UnlessBothMatched" >> beam.FlatMap(_unless_both_hash_matched)


def _confirm_at_a(item, cfg) -> Iterator:
    """At key a: the photometric check of each aligned pair with a's thumbnail -> Edge."""
    key, grouped = item
    data, aligned = _one(grouped, "feat"), sorted(grouped["aligned"])
    if data is None:
        return
    fa = Features.from_bytes(data)
    for other, al, photo in aligned:
        v = confirm(Alignment.from_bytes(al), fa, Features.from_bytes(photo), cfg)
        beam.metrics.Metrics.counter(EMBEDDER, "verified" if v.copy else "rejected").inc()
        if v.copy:
            yield Edge(key, other, round(v.agreement, 4), EMBEDDER)


def _nearest(item) -> Neighbour:
    key, best = item
    sim, other = best
    return Neighbour(key, EMBEDDER, other, sim)


def _best(values) -> tuple[float, str]:
    return max(values, key=lambda v: (v[0], [-ord(c) for c in v[1]]), default=(0.0, ""))


class FindOrbCopies(beam.PTransform):
    """(key, feature bytes) -> {"edges": Edge, "neighbours": Neighbour} of verified local-feature
    copies. Features come from ProcessShards (computed with the decode, cached per shard)."""

    def __init__(self, cfg, hash_edges=None):
        """hash_edges: the hash stage's Edges; with ``cfg.only_unmatched`` a candidate pair is
        verified only when the hash left at least one of its images unmatched."""
        super().__init__()
        self.cfg = cfg
        self.hash_edges = hash_edges if cfg.only_unmatched else None

    def expand(self, feats):
        from transforms.outputs import multi_output

        cfg = self.cfg
        # the vocabulary grows with the collection (local_features.vocabulary): one count, a scalar side input
        n_images = beam.pvalue.AsSingleton(feats | "CountImages" >> beam.combiners.Count.Globally())
        by_part = (
            feats
            | "Postings" >> beam.FlatMap(_postings, cfg=cfg, n_images=n_images)
            | "ByWordPartition" >> beam.GroupByKey()
        )
        split = multi_output(by_part, "WordPairs", _partition_pairs, ["stop"], "pairs", max_df=cfg.max_df)
        stop = split["stop"]  # (key, (vocabulary, its stop-words in one partition))
        candidates = (
            split["pairs"]
            | "VotesByFirstKey" >> beam.GroupByKey()
            | "SumVotes" >> beam.FlatMap(_sum_votes, min_votes=cfg.min_votes)
        )
        capped = (
            candidates
            | "BothEndsOfCandidate"
            >> beam.FlatMap(lambda kv: [(kv[0][0], (kv[1], kv[0][1])), (kv[0][1], (kv[1], kv[0][0]))])
            | "CandidatesPerKey" >> beam.GroupByKey()
            | "TopCandidates" >> beam.FlatMap(lambda kv, k: top_candidates(kv[0], list(kv[1]), k), k=cfg.max_candidates)
            | "KeptPair" >> beam.Map(lambda pair: (pair, 1))
            | "OncePerPair" >> beam.CombinePerKey(sum)
        )
        # features travel once per image to each join; per pair only a's matchable record (and,
        # for the few pairs that align, b's thumbnail) is shipped: memory O(pairs x ~18 KB)
        partners = capped | "ToSmallerKey" >> beam.Map(lambda kv: (kv[0][0], kv[0][1]))
        if self.hash_edges is not None:
            partners = partners | "DropHashMatched" >> DropHashMatched(self.hash_edges)
        at_a = {"feat": feats, "partner": partners, "stop": stop} | "JoinPartners" >> beam.CoGroupByKey()
        shipped = at_a | "ShipMatchable" >> beam.FlatMap(_ship_matchable)
        at_b = {"feat": feats, "matchable": shipped, "stop": stop} | "JoinMatchable" >> beam.CoGroupByKey()
        aligned = at_b | "Align" >> beam.FlatMap(_align_at_b, cfg=cfg)
        back = {"feat": feats, "aligned": aligned} | "JoinAligned" >> beam.CoGroupByKey()
        edges = back | "Confirm" >> beam.FlatMap(_confirm_at_a, cfg=cfg)
        neighbours = (
            edges
            | "BothEnds"
            >> beam.FlatMap(lambda e: [(e.key_a, (e.similarity, e.key_b)), (e.key_b, (e.similarity, e.key_a))])
            | "Best" >> beam.CombinePerKey(_best)
            | "Neighbour" >> beam.Map(_nearest)
        )
        return {"edges": edges, "neighbours": neighbours}
