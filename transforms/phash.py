"""Weight-free copy detection: multi-crop DCT perceptual hashes searched with a FAISS binary index.

A plain 64-bit pHash finds resizes, re-encodes and brightness shifts but misses centre crops:
a crop keeping 85-93% of each side moves every low frequency. Each image therefore gets a hash
of its full frame *and* of centre crops keeping 92% and 85% of each side; a third party's crop
of an original lines up (to within ~4% of scale) with one of the original's crops, so the
copy's full-frame hash is close to it. Two images are a copy pair when the full-frame hash of
one is within the Hamming threshold of any hash of the other. Each hash is a 16x16 block of
the DCT of a 64x64 grayscale image (256 bits, half of them set), which keeps merely similar
photos of different scenes far apart (on Flickr8k: copies <= 52 of 256 bits, other photos
>= 82; see scripts/eval_copies.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import apache_beam as beam
import numpy as np

from schemas.elements import Edge, Neighbour

log = logging.getLogger(__name__)

EMBEDDER = "phash"
CROPS = (1.0, 0.92, 0.85)  # centre-crop fractions of each side hashed per image; CROPS[0] is the full frame
SIDE = 64  # grayscale resize before the DCT
BLOCK = 16  # low-frequency block kept: BLOCK*BLOCK bits
BITS = BLOCK * BLOCK
CODE_BYTES = BITS // 8
NEIGHBOUR_K = len(CROPS) + 4  # k-NN depth for each sample's nearest neighbour (its own hashes take up to len(CROPS))


def _dct_bits(gray: np.ndarray) -> np.ndarray:
    from scipy.fft import dctn

    coeffs = dctn(gray, norm="ortho")[:BLOCK, :BLOCK].ravel()
    coeffs[0] = np.median(coeffs[1:])  # the DC term says only "how bright": neutralise it
    return np.packbits(coeffs > np.median(coeffs))


def compute_hashes(img) -> np.ndarray:
    """RGB PIL image -> uint8 array (len(CROPS), CODE_BYTES): one hash per centre crop."""
    from PIL import Image

    gray = img.convert("L")
    w, h = gray.size
    out = np.empty((len(CROPS), CODE_BYTES), dtype=np.uint8)
    for i, frac in enumerate(CROPS):
        cw, ch = max(1, round(w * frac)), max(1, round(h * frac))
        left, top = (w - cw) // 2, (h - ch) // 2
        crop = gray.crop((left, top, left + cw, top + ch)) if frac < 1.0 else gray
        small = np.asarray(crop.resize((SIDE, SIDE), Image.Resampling.BILINEAR), dtype=np.float32)
        out[i] = _dct_bits(small)
    return out


def hamming_threshold(max_hamming: int) -> int:
    """Config ``max_hamming`` is in 64-bit units (the usual pHash scale); scale it to BITS."""
    return int(round(max_hamming * BITS / 64))


def build_index(db: np.ndarray, exact_below: int, nprobe: int, seed: int = 0):
    """A FAISS binary index over ``db`` (n, CODE_BYTES): exact (flat) for small n, IVF beyond.

    The flat scan costs ~1.5 ns per code pair on one core: fine to ~300k codes (a minute),
    quadratic after. The IVF index clusters codes in Hamming space and probes ``nprobe``
    cells per query, trained on a seeded sample so runs are repeatable.
    """
    import faiss

    if len(db) <= exact_below:
        index = faiss.IndexBinaryFlat(BITS)
    else:
        nlist = int(max(1, min(65536, 4 * np.sqrt(len(db)), len(db) // 40)))  # >= 40 codes a cell to train
        index = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(BITS), BITS, nlist)
        rng = np.random.default_rng(seed)
        sample = db[np.sort(rng.choice(len(db), size=min(len(db), nlist * 64), replace=False))]
        index.train(sample)
        index.nprobe = min(nprobe, nlist)
    index.add(db)
    return index


def _candidates(index, queries: np.ndarray, max_bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query row, db row, distance) of every range hit within max_bits plus each query's k-NN."""
    lims, dist, ids = index.range_search(queries, max_bits + 1)  # FAISS' radius is exclusive
    q_range = np.repeat(np.arange(len(queries)), np.diff(lims.astype(np.int64)))
    k = min(NEIGHBOUR_K, index.ntotal)
    knn_dist, knn_ids = index.search(queries, k)
    q_knn = np.repeat(np.arange(len(queries)), k)
    keep = knn_ids.ravel() >= 0
    q = np.concatenate([q_range, q_knn[keep]])
    j = np.concatenate([ids.astype(np.int64), knn_ids.ravel()[keep]])
    d = np.concatenate([dist.astype(np.int64), knn_dist.ravel()[keep].astype(np.int64)])
    return q, j, d


def _best_per_pair(a: np.ndarray, b: np.ndarray, d: np.ndarray, n: int) -> tuple[np.ndarray, ...]:
    """Unordered sample pairs (a != b) -> the smallest distance of each pair, sorted by pair."""
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    keep = lo != hi
    lo, hi, d = lo[keep], hi[keep], d[keep]
    pair = lo * n + hi
    order = np.lexsort((d, pair))
    first = np.ones(len(order), dtype=bool)
    first[1:] = pair[order][1:] != pair[order][:-1]
    sel = order[first]
    return lo[sel], hi[sel], d[sel]


def find_copy_pairs(
    keys: list[str],
    codes: np.ndarray,
    max_bits: int,
    exact_below: int = 300_000,
    nprobe: int = 32,
    seed: int = 0,
) -> tuple[list[Edge], list[Neighbour]]:
    """keys[i] (sorted, unique) has codes[i] of shape (len(CROPS), CODE_BYTES) -> edges, neighbours.

    A pair's distance is the smallest over (full frame of one, any crop of the other). Edges:
    pairs within ``max_bits``. Neighbours: each sample's nearest other sample among its range
    hits and k-NN (ties -> the smaller key), whatever the threshold, so it can move later.
    """
    n, per = len(keys), len(CROPS)
    if n < 2:
        return [], []
    db = np.ascontiguousarray(codes.reshape(n * per, CODE_BYTES))
    index = build_index(db, exact_below, nprobe, seed)
    q, j, d = _candidates(index, np.ascontiguousarray(codes[:, 0]), max_bits)
    lo, hi, dist = _best_per_pair(q, j // per, d, n)
    within = dist <= max_bits
    edges = [
        Edge(keys[a], keys[b], 1.0 - int(x) / BITS, EMBEDDER)
        for a, b, x in zip(lo[within], hi[within], dist[within], strict=True)
    ]
    return edges, _nearest(keys, lo, hi, dist)


def _nearest(keys: list[str], lo: np.ndarray, hi: np.ndarray, dist: np.ndarray) -> list[Neighbour]:
    node = np.concatenate([lo, hi])
    other = np.concatenate([hi, lo])
    d = np.concatenate([dist, dist])
    order = np.lexsort((other, d, node))  # per node: smallest distance, then smallest key
    first = np.ones(len(order), dtype=bool)
    first[1:] = node[order][1:] != node[order][:-1]
    return [
        Neighbour(keys[x], EMBEDDER, keys[y], 1.0 - int(z) / BITS)
        for x, y, z in zip(node[order][first], other[order][first], d[order][first], strict=True)
    ]


def stack_codes(items: list[tuple[str, bytes]]) -> tuple[list[str], np.ndarray]:
    """(key, code bytes) -> sorted unique keys and their codes; wrong-sized codes are skipped."""
    size = len(CROPS) * CODE_BYTES
    good, seen = [], set()
    for key, code in sorted(items):
        if len(code) != size:
            log.warning("phash: %s has %d code bytes, expected %d; skipped", key, len(code), size)
            beam.metrics.Metrics.counter("phash", "bad_code_size").inc()
        elif key not in seen:  # a key repeated across shards: its first (smallest) code wins
            seen.add(key)
            good.append((key, code))
    codes = np.frombuffer(b"".join(c for _, c in good), dtype=np.uint8).reshape(len(good), len(CROPS), CODE_BYTES)
    return [k for k, _ in good], codes


def _search(items: list[tuple[str, bytes]], max_bits: int, exact_below: int, nprobe: int, seed: int) -> Iterator:
    from pipeline import progress

    progress.begin("search")
    keys, codes = stack_codes(items)
    edges, neighbours = find_copy_pairs(keys, codes, max_bits, exact_below, nprobe, seed)
    log.info("phash: %d samples, %d copy pairs", len(keys), len(edges))
    progress.advance("search", len(keys))
    beam.metrics.Metrics.counter("phash", "copy_pairs").inc(len(edges))
    yield from edges
    for nb in neighbours:
        yield beam.pvalue.TaggedOutput("neighbours", nb)


class FindPhashCopies(beam.PTransform):
    """PCollection[(key, code bytes)] -> {"edges": Edge, "neighbours": Neighbour}.

    A global step: every sample's codes are gathered to one worker and searched there. That is
    fine at scale because the codes are small (96 bytes a sample: 1M samples are 96 MB, 10M
    under 1 GB) and the search is FAISS on packed bits: exact below ``exact_below`` hashes
    (~1.5 ns per pair of codes), an IVF binary index above it (each query scans ``nprobe`` of
    ~4*sqrt(n) cells). Only the edges and one neighbour per sample come back out.
    """

    def __init__(self, cfg, seed: int = 0):
        super().__init__()
        self.max_bits = hamming_threshold(cfg.max_hamming)
        self.exact_below = cfg.exact_below
        self.nprobe = cfg.nprobe
        self.seed = seed

    def expand(self, codes):
        from transforms.outputs import multi_output

        gathered = codes | "GatherCodes" >> beam.combiners.ToList()
        out = multi_output(
            gathered,
            "SearchCodes",
            _search,
            ["neighbours"],
            "edges",
            max_bits=self.max_bits,
            exact_below=self.exact_below,
            nprobe=self.nprobe,
            seed=self.seed,
        )
        return {"edges": out["edges"], "neighbours": out["neighbours"]}
