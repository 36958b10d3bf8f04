"""Weight-free copy detection: multi-crop DCT perceptual hashes searched with a FAISS binary index.

A plain 64-bit pHash finds resizes, re-encodes and brightness shifts but misses centre crops:
a crop keeping 85-93% of each side moves every low frequency. Each image therefore gets hashes
of its full frame *and* of centre crops; a copy cropped by a third party lines up with one of
the original's crops. Two images are a copy pair when any of their hash pairs is within the
Hamming threshold. Hashes are longer than 64 bits (a 16x16 block of the DCT of a 64x64
grayscale image: 256 bits), which keeps false pairs rare between merely similar photos.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import apache_beam as beam
import numpy as np

from schemas.elements import Edge, Neighbour

log = logging.getLogger(__name__)

EMBEDDER = "phash"
CROPS = (1.0, 0.89)  # centre-crop fractions of each side hashed per image
SIDE = 64  # grayscale resize before the DCT
BLOCK = 16  # low-frequency block kept: BLOCK*BLOCK bits
BITS = BLOCK * BLOCK
DEFAULT_MAX_HAMMING = 0.22  # as a fraction of BITS; see the config's max_hamming


def _dct_bits(gray: np.ndarray) -> np.ndarray:
    from scipy.fft import dctn

    coeffs = dctn(gray, norm="ortho")[:BLOCK, :BLOCK].ravel()
    coeffs[0] = np.median(coeffs[1:])  # the DC term says only "how bright": neutralise it
    return np.packbits(coeffs > np.median(coeffs))


def compute_hashes(img) -> np.ndarray:
    """RGB PIL image -> uint8 array (len(CROPS), BITS // 8): one hash per centre crop."""
    from PIL import Image

    gray = img.convert("L")
    w, h = gray.size
    out = np.empty((len(CROPS), BITS // 8), dtype=np.uint8)
    for i, frac in enumerate(CROPS):
        cw, ch = max(1, round(w * frac)), max(1, round(h * frac))
        left, top = (w - cw) // 2, (h - ch) // 2
        crop = gray.crop((left, top, left + cw, top + ch)) if frac < 1.0 else gray
        small = np.asarray(crop.resize((SIDE, SIDE), Image.BILINEAR), dtype=np.float32)
        out[i] = _dct_bits(small)
    return out


def hamming_threshold(max_hamming: int) -> int:
    """Config ``max_hamming`` is in 64-bit units (the usual pHash scale); scale it to BITS."""
    return int(round(max_hamming * BITS / 64))


def find_copy_pairs(keys: list[str], codes: np.ndarray, max_bits: int) -> tuple[list[Edge], list[Neighbour]]:
    """keys[i] has codes[i] of shape (len(CROPS), BITS//8) -> copy edges and nearest neighbours.

    Pairs of the same image's own crops are ignored; a pair's distance is the minimum over
    its crop combinations. FAISS IndexBinaryFlat range search: exact, and fast at the sizes one
    worker holds (8 bytes of 64-bit pHash per sample is what scales; see FindPhashCopies).
    """
    import faiss

    n, per = len(keys), len(CROPS)
    if n < 2:
        return [], []
    flat = np.ascontiguousarray(codes.reshape(n * per, BITS // 8))
    index = faiss.IndexBinaryFlat(BITS)
    index.add(flat)
    lims, dist, ids = index.range_search(flat, max_bits + 1)
    owner = np.repeat(np.arange(n), per)
    best: dict[tuple[int, int], int] = {}
    for q in range(n * per):
        a = owner[q]
        for d, j in zip(dist[lims[q] : lims[q + 1]], ids[lims[q] : lims[q + 1]], strict=True):
            b = owner[j]
            if a == b:
                continue
            pair = (a, b) if a < b else (b, a)
            if d < best.get(pair, BITS + 1):
                best[pair] = int(d)
    return _edges_and_neighbours(keys, best)


def _edges_and_neighbours(keys: list[str], best: dict[tuple[int, int], int]):
    edges, nearest = [], {}
    for (a, b), d in sorted(best.items()):
        sim = 1.0 - d / BITS
        ka, kb = (keys[a], keys[b]) if keys[a] < keys[b] else (keys[b], keys[a])
        edges.append(Edge(ka, kb, sim, EMBEDDER))
        for x, y in ((a, b), (b, a)):
            if x not in nearest or (sim, keys[nearest[x][0]] > keys[y]) > (nearest[x][1], False):
                nearest[x] = (y, sim)
    neighbours = [Neighbour(keys[x], EMBEDDER, keys[y], s) for x, (y, s) in sorted(nearest.items())]
    return edges, neighbours


def _search(items: list[tuple[str, bytes]], max_bits: int) -> Iterator:
    items = sorted(items)
    keys = [k for k, _ in items]
    codes = np.frombuffer(b"".join(c for _, c in items), dtype=np.uint8).reshape(len(items), len(CROPS), BITS // 8)
    edges, neighbours = find_copy_pairs(keys, codes, max_bits)
    log.info("phash: %d samples, %d copy pairs", len(keys), len(edges))
    yield from edges
    for n in neighbours:
        yield beam.pvalue.TaggedOutput("neighbours", n)


class FindPhashCopies(beam.PTransform):
    """(key, code bytes) -> {"edges": Edge, "neighbours": Neighbour}.

    A global step: the codes (64 bytes a sample) are gathered to one worker and searched
    there: 10M samples are 640 MB of codes. Beyond that, shard the search by a prefix of a
    coarse 64-bit hash (multi-index hashing) before this step.
    """

    def __init__(self, cfg):
        super().__init__()
        self.max_bits = hamming_threshold(cfg.max_hamming)

    def expand(self, codes):
        out = (
            codes
            | "GatherCodes" >> beam.combiners.ToList()
            | "SearchCodes" >> beam.FlatMap(_search, max_bits=self.max_bits).with_outputs("neighbours", main="edges")
        )
        return {"edges": out["edges"], "neighbours": out["neighbours"]}
