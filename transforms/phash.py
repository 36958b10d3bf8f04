"""Weight-free copy detection: multi-crop DCT perceptual hashes searched by k-means cell.

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
import zlib
from dataclasses import dataclass

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


def code_vectors(codes: np.ndarray) -> np.ndarray:
    """(m, H, CODE_BYTES) packed codes -> (m, H, BITS) float32 +/-1/16: the inner product of two
    hashes is 1 - 2 * hamming / BITS, exact in bf16 and fp32."""
    bits = np.unpackbits(np.asarray(codes, dtype=np.uint8), axis=-1).astype(np.float32)
    return (bits * 2.0 - 1.0) / np.sqrt(BITS)


def code_similarity(cosine: np.ndarray) -> np.ndarray:
    """Inner product of +/-1 codes -> the reported similarity 1 - hamming / BITS."""
    return 1.0 - distance_of(cosine) / BITS


def distance_of(cosine: np.ndarray) -> np.ndarray:
    return np.rint((1.0 - np.asarray(cosine, dtype=np.float64)) * BITS / 2)


def cosine_threshold(max_bits: int) -> float:
    """Hamming <= max_bits <=> cosine >= this (half a step of slack: products are exact)."""
    return 1.0 - 2.0 * max_bits / BITS - 1.0 / BITS


def query_rows() -> tuple[int, ...]:
    """Hash rows compared against every hash of the other image (row 0: the full frame)."""
    return tuple(globals().get("QUERY_ROWS", (0,)))


@dataclass(frozen=True)
class SearchSettings:
    """The cell search's settings for hash codes (``PhashConfig`` carries only the threshold and
    the exact-search bound)."""

    n_cells: int = 0
    top_m: int = 2
    sample_size: int = 0
    cell_groups: int = 1
    single_cell_below: int = 50_000
    second_cell_margin: float = 0.1


def find_copy_pairs(
    keys: list[str], codes: np.ndarray, max_bits: int, single_cell_below: int = 50_000, n_cells: int = 0, seed: int = 0
) -> tuple[list[Edge], list[Neighbour]]:
    """keys[i] (unique) has codes[i] of shape (H, CODE_BYTES) -> edges, neighbours (in process).

    A pair's distance is the smallest over (a query row of one, any hash of the other). Edges:
    pairs within ``max_bits``. Neighbours: each sample's nearest other sample in its cells, ties
    -> the smaller key, whatever the threshold, so it can move later. Exact in one cell
    (n <= ``single_cell_below``); the same partitioned search as the pipeline beyond.
    """
    from transforms.cell_search import search_in_memory

    if len(keys) < 2:
        return [], []
    found = search_in_memory(
        np.asarray(keys),
        code_vectors(codes),
        query_rows(),
        cosine_threshold(max_bits),
        single_cell_below=single_cell_below,
        requested_cells=n_cells,
        margin=SearchSettings.second_cell_margin,
        seed=seed,
    )
    a, b, s = found["edges"]
    order = np.lexsort((b, a))
    edges = [
        Edge(str(x), str(y), float(z), EMBEDDER)
        for x, y, z in zip(a[order], b[order], code_similarity(s[order]), strict=True)
    ]
    w, o, ns = found["nn"]
    neighbours = [
        Neighbour(str(x), EMBEDDER, str(y), float(z)) for x, y, z in zip(w, o, code_similarity(ns), strict=True)
    ]
    return edges, neighbours


def stack_codes(items) -> tuple[list[str], np.ndarray]:
    """(key, code bytes) -> sorted unique keys and codes (n, H, CODE_BYTES); H = the most hashes
    any code has (a code with fewer repeats its full frame, which changes no distance). Codes
    that are empty or not whole hashes are skipped."""
    good, seen = [], set()
    for key, code in sorted(items):
        if not code or len(code) % CODE_BYTES:
            log.warning("phash: %s has %d code bytes, not a multiple of %d; skipped", key, len(code), CODE_BYTES)
            beam.metrics.Metrics.counter("phash", "bad_code_size").inc()
        elif key not in seen:  # a key repeated across shards: its first (smallest) code wins
            seen.add(key)
            good.append((key, np.frombuffer(code, dtype=np.uint8).reshape(-1, CODE_BYTES)))
    per = max((len(c) for _, c in good), default=1)
    codes = np.empty((len(good), per, CODE_BYTES), dtype=np.uint8)
    for i, (_, c) in enumerate(good):
        codes[i, : len(c)] = c
        codes[i, len(c) :] = c[0]
    return [k for k, _ in good], codes


PHASH_BUCKETS = 1024  # per-sample codes are batched by key hash before the cell search


def _bucket(item) -> tuple[int, tuple[str, bytes]]:
    return zlib.crc32(item[0].encode("utf-8")) % PHASH_BUCKETS, item


def _batch(group) -> tuple[np.ndarray, np.ndarray]:
    keys, codes = stack_codes(list(group[1]))
    return np.asarray(keys, dtype=str), codes


class FindPhashCopies(beam.PTransform):
    """PCollection[(key, code bytes)] -> {"edges": Edge, "neighbours": Neighbour}.

    Codes are batched by key hash (one shuffle of 100-odd bytes a sample), then searched like
    embeddings (``transforms.ann_edges.CellSearch``): each hash a +/-1 vector, k-means cells on a
    bounded sample, rows shuffled by cell as arrays, exact products inside each cell. One cell
    (exact) up to ``single_cell_below`` samples.
    """

    def __init__(self, cfg, seed: int = 0):
        super().__init__()
        self.max_bits = hamming_threshold(cfg.max_hamming)
        self.settings = SearchSettings(single_cell_below=min(cfg.exact_below, SearchSettings.single_cell_below))
        self.seed = seed

    def expand(self, codes):
        from transforms.ann_edges import CellSearch

        batches = (
            codes
            | "BucketCodes" >> beam.Map(_bucket)
            | "GroupCodes" >> beam.GroupByKey()
            | "StackCodes" >> beam.Map(_batch)
        )
        return batches | "SearchCodes" >> CellSearch(
            cosine_threshold(self.max_bits),
            EMBEDDER,
            self.settings,
            self.seed,
            vectorize=code_vectors,
            query_rows=query_rows(),
            similarity=code_similarity,
        )
