"""The ORB copy embedder on Beam: features per sample, candidates per visual word, verified pairs.

Partitioning (no step gathers all descriptors): features are computed where samples are
decoded; every (word, key) posting is shuffled by word; each word's posting list (at most
``max_df`` keys, or it is a stop-word and emits only its id) yields key pairs whose votes are
summed per pair; candidate pairs meet their two feature records through two keyed joins; each
pair is verified on its own. See docs/copy_detection.md for the cost at 1e8 images.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator

import apache_beam as beam
import numpy as np

from schemas.elements import Edge, Neighbour
from transforms.local_features import EMBEDDER, Features, extract_features, verify, words

log = logging.getLogger(__name__)


def keep_mask(feat: Features, cfg, stop: set) -> np.ndarray:
    """Descriptors to match: those with at most half of their words stop-words."""
    if not stop or len(feat.desc) == 0:
        return np.ones(len(feat.desc), bool)
    w = words(feat.desc, cfg.tables, cfg.word_bits)
    stopped = np.isin(w, np.fromiter(stop, np.int64, len(stop)))
    return stopped.sum(axis=1) * 2 <= cfg.tables


def postings(feat: Features, cfg) -> np.ndarray:
    return np.unique(words(feat.desc, cfg.tables, cfg.word_bits))


def candidate_pairs(post: dict[str, np.ndarray], cfg) -> tuple[list[tuple[str, str, int]], set]:
    """In memory: key -> its unique words -> ([(key a, key b, votes)] with votes >= min_votes, stop words)."""
    keys = sorted(post)
    word = np.concatenate([post[k] for k in keys]) if keys else np.zeros(0, np.int64)
    owner = np.concatenate([np.full(len(post[k]), i) for i, k in enumerate(keys)]) if keys else word
    order = np.argsort(word, kind="stable")
    word, owner = word[order], owner[order]
    starts = np.flatnonzero(np.r_[True, word[1:] != word[:-1]])
    counts = np.diff(np.r_[starts, len(word)])
    stop = set(word[starts[counts > cfg.max_df]].tolist())
    votes: dict[tuple[int, int], int] = {}
    for s, c in zip(starts[(counts >= 2) & (counts <= cfg.max_df)], counts[(counts >= 2) & (counts <= cfg.max_df)]):
        for a, b in itertools.combinations(owner[s : s + c].tolist(), 2):
            votes[(a, b)] = votes.get((a, b), 0) + 1
    pairs = [(keys[a], keys[b], v) for (a, b), v in sorted(votes.items()) if v >= cfg.min_votes]
    return pairs, stop


def find_orb_pairs(feats: dict[str, Features], cfg, skip: set | None = None) -> list[Edge]:
    """In memory (tests, scripts/eval_copies.py): the same algorithm as ``FindOrbCopies``."""
    pairs, stop = candidate_pairs({k: postings(f, cfg) for k, f in feats.items()}, cfg)
    masks = {k: keep_mask(f, cfg, stop) for k, f in feats.items()}
    edges = []
    for a, b, _ in pairs:
        if skip and a in skip and b in skip:
            continue
        v = verify(feats[a], feats[b], cfg, masks[a], masks[b])
        if v.copy:
            edges.append(Edge(a, b, round(v.agreement, 4), EMBEDDER))
    return edges


# ---- Beam ----


class ExtractOrbFn(beam.DoFn):
    """Sample -> (key, feature bytes); undecodable samples are skipped (ProcessShards reports them)."""

    def __init__(self, cfg, max_pixels: int):
        self.cfg, self.max_pixels = cfg, max_pixels

    def setup(self):
        import cv2

        cv2.setNumThreads(1)  # one worker process per core: no nested threads
        self.done = beam.metrics.Metrics.counter(EMBEDDER, "extracted")
        self.failed = beam.metrics.Metrics.counter(EMBEDDER, "undecodable")

    def process(self, sample) -> Iterator:
        from transforms.decode import DecodeError, decode_image

        try:
            img = decode_image(sample.image, sample.image_ext, self.max_pixels)
        except DecodeError:
            self.failed.inc()
            return
        self.done.inc()
        yield sample.key, extract_features(img, self.cfg).to_bytes()


def _postings(item, cfg) -> Iterator:
    key, data = item
    for w in postings(Features.from_bytes(data), cfg).tolist():
        yield w, key


def _word_pairs(item, max_df: int) -> Iterator:
    word, keys = item
    keys = sorted(set(keys))
    if len(keys) > max_df:
        beam.metrics.Metrics.counter(EMBEDDER, "stop_words").inc()
        yield beam.pvalue.TaggedOutput("stop", word)
        return
    for pair in itertools.combinations(keys, 2):
        yield pair, 1


def _route(item) -> Iterator:
    (a, b), _ = item
    yield a, (a, b)
    yield b, (a, b)


def _attach(item) -> Iterator:
    key, grouped = item
    feats = list(grouped["feat"])
    if not feats:
        return
    for pair in grouped["pair"]:
        yield pair, (key, feats[0])


def _verify(item, cfg, stop: list) -> Iterator:
    (a, b), parts = item
    found = dict(parts)
    if a not in found or b not in found:
        return
    stop_set = set(stop)
    fa, fb = Features.from_bytes(found[a]), Features.from_bytes(found[b])
    v = verify(fa, fb, cfg, keep_mask(fa, cfg, stop_set), keep_mask(fb, cfg, stop_set))
    beam.metrics.Metrics.counter(EMBEDDER, "verified" if v.copy else "rejected").inc()
    if v.copy:
        yield Edge(a, b, round(v.agreement, 4), EMBEDDER)


def _nearest(item) -> Neighbour:
    key, best = item
    sim, other = best
    return Neighbour(key, EMBEDDER, other, sim)


def _best(values) -> tuple[float, str]:
    return max(values, key=lambda v: (v[0], [-ord(c) for c in v[1]]), default=(0.0, ""))


class FindOrbCopies(beam.PTransform):
    """Samples -> {"edges": Edge, "neighbours": Neighbour} of verified local-feature copies."""

    def __init__(self, cfg, max_pixels: int = 64_000_000):
        super().__init__()
        self.cfg, self.max_pixels = cfg, max_pixels

    def expand(self, samples):
        from transforms.outputs import multi_output

        cfg = self.cfg
        feats = samples | "ExtractOrb" >> beam.ParDo(ExtractOrbFn(cfg, self.max_pixels))
        by_word = feats | "Postings" >> beam.FlatMap(_postings, cfg=cfg) | "ByWord" >> beam.GroupByKey()
        split = multi_output(by_word, "WordPairs", _word_pairs, ["stop"], "pairs", max_df=cfg.max_df)
        candidates = (
            split["pairs"]
            | "Votes" >> beam.CombinePerKey(sum)
            | "EnoughVotes" >> beam.Filter(lambda kv, n: kv[1] >= n, n=cfg.min_votes)
        )
        routed = candidates | "Route" >> beam.FlatMap(_route)
        joined = {"feat": feats, "pair": routed} | "JoinFeatures" >> beam.CoGroupByKey()
        edges = (
            joined
            | "Attach" >> beam.FlatMap(_attach)
            | "ByPair" >> beam.GroupByKey()
            | "Verify" >> beam.FlatMap(_verify, cfg=cfg, stop=beam.pvalue.AsList(split["stop"]))
        )
        neighbours = (
            edges
            | "BothEnds"
            >> beam.FlatMap(lambda e: [(e.key_a, (e.similarity, e.key_b)), (e.key_b, (e.similarity, e.key_a))])
            | "Best" >> beam.CombinePerKey(_best)
            | "Neighbour" >> beam.Map(_nearest)
        )
        return {"edges": edges, "neighbours": neighbours}
