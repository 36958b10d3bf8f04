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
# the hash rows of one image: the frame and its centre crops, the same mirrored (a flipped copy's
# frame lands on them), and the frame inside trimmed borders (a letterboxed or padded copy's
# trimmed frame lands on the original's frame).
ROWS = tuple(f"{m}{c}" for m in ("", "mirror:") for c in CROPS) + ("trimmed",)
N_HASHES = len(ROWS)
QUERY_ROWS = (0, N_HASHES - 1)  # rows searched against every row of the others: the frame, trimmed or not
HASH_VERSION = 2  # bump when the rows change: cached codes of another version are recomputed
NEIGHBOUR_K = N_HASHES + 4  # k-NN depth for each sample's nearest neighbour (its own hashes take up to N_HASHES)
TRIM_SIDE = 128  # border trimming looks at a copy this size (averages away JPEG and sensor noise)
TRIM_ENERGY = 0.15  # a border line has under this share of the central lines' detail
TRIM_MAX = 0.4  # at most this share of a side is trimmed from each edge
# an image whose trimmed frame is largely *uniform* (TEMPLATE_WINDOW squares within 2 grey levels
# on a 256-pixel copy) may be a screenshot or UI template, whose low frequencies are the
# template's (two photos in one template hash alike). Such an image is hashed on its content box
# instead: the largest blob where nearly every pixel has detail (text and UI lines have flat
# gaps), i.e. the photo inside the template.
TEMPLATE_FLAT = 0.08  # Flickr photos and their copies: ~1% above; screenshots: ~90%
TEMPLATE_WINDOW = 15
CONTENT_OPEN = 9  # window (pixels of a 2*TRIM_SIDE copy) of the density test and the opening
CONTENT_MAX = 0.85  # a content box this share of the frame or more is the frame itself
TEMPLATE_BOX = 0.45  # a content box under this share of the frame is a photo inside a template


def _dct_bits(gray: np.ndarray) -> np.ndarray:
    from scipy.fft import dctn

    coeffs = dctn(gray, norm="ortho")[:BLOCK, :BLOCK].ravel()
    coeffs[0] = np.median(coeffs[1:])  # the DC term says only "how bright": neutralise it
    return np.packbits(coeffs > np.median(coeffs))


def _edge_run(energy: np.ndarray, limit: float) -> int:
    """How many leading lines have less detail than ``limit`` (capped at TRIM_MAX of them)."""
    cap = int(len(energy) * TRIM_MAX)
    low = energy[:cap] < limit
    return cap if low.all() else int(np.argmin(low))


def trim_box(gray) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the content inside uniform or blurred borders and letterboxing.

    A border line (a column for the left/right edges) has almost no detail *along* it: the mean
    absolute step between neighbouring pixels along a column of a uniform bar or a blurred pad is
    a small share of the central columns'. The photo's own edge does not count (its step is across
    the line), so the trim stops right at it. Uniform photos (no central detail) are not trimmed.
    """
    from PIL import Image

    w, h = gray.size
    scale = TRIM_SIDE / max(w, h)
    small = (
        gray.resize((max(8, round(w * scale)), max(8, round(h * scale))), Image.Resampling.BOX) if scale < 1 else gray
    )
    a = np.asarray(small, dtype=np.float32)
    cols = np.abs(np.diff(a, axis=0)).mean(axis=0)  # detail along each column
    rows = np.abs(np.diff(a, axis=1)).mean(axis=1)  # detail along each row
    sw, sh = len(cols), len(rows)
    ref_c = float(np.median(cols[sw // 4 : sw - sw // 4])) if sw >= 4 else 0.0
    ref_r = float(np.median(rows[sh // 4 : sh - sh // 4])) if sh >= 4 else 0.0
    if min(ref_c, ref_r) < 1.0:
        return 0, 0, w, h
    left, right = _edge_run(cols, TRIM_ENERGY * ref_c), _edge_run(cols[::-1], TRIM_ENERGY * ref_c)
    top, bottom = _edge_run(rows, TRIM_ENERGY * ref_r), _edge_run(rows[::-1], TRIM_ENERGY * ref_r)
    fx, fy = w / sw, h / sh
    box = (round(left * fx), round(top * fy), w - round(right * fx), h - round(bottom * fy))
    return box if box[2] - box[0] >= 8 and box[3] - box[1] >= 8 else (0, 0, w, h)


def _frame_hashes(gray, crops=CROPS) -> list[np.ndarray]:
    from PIL import Image

    w, h = gray.size
    out = []
    for frac in crops:
        cw, ch = max(1, round(w * frac)), max(1, round(h * frac))
        left, top = (w - cw) // 2, (h - ch) // 2
        crop = gray.crop((left, top, left + cw, top + ch)) if frac < 1.0 else gray
        out.append(_dct_bits(np.asarray(crop.resize((SIDE, SIDE), Image.Resampling.BILINEAR), dtype=np.float32)))
    return out


def _small(gray, side: int = 2 * TRIM_SIDE):
    """(a <= side BOX-downscaled copy as int16, its scale)."""
    from PIL import Image

    small = gray.copy()
    small.thumbnail((side, side), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.int16), gray.width / small.width


def _flat(a: np.ndarray, window: int, tol: int) -> np.ndarray:
    from scipy.ndimage import maximum_filter, minimum_filter

    return (maximum_filter(a, window) - minimum_filter(a, window)) <= tol


def flat_share(gray) -> float:
    """Share of pixels in a uniform patch (a TEMPLATE_WINDOW square within 2 grey levels): UI
    fills are uniform over large areas; skies, walls and JPEG-flattened blocks drift."""
    return float(_flat(_small(gray)[0], TEMPLATE_WINDOW, 2).mean())


def content_box(gray) -> tuple[int, int, int, int] | None:
    """The box of the photo inside a template-like (largely flat) image, or None."""
    from scipy import ndimage

    a, scale = _small(gray)
    if float(_flat(a, TEMPLATE_WINDOW, 2).mean()) <= TEMPLATE_FLAT:
        return None
    flat = _flat(a, 3, 1)
    dense = ndimage.uniform_filter((~flat).astype(np.float32), CONTENT_OPEN) > 0.9  # text and lines have gaps
    detail = ndimage.binary_opening(dense, structure=np.ones((CONTENT_OPEN, CONTENT_OPEN), bool))
    labels, n = ndimage.label(detail)
    if n == 0:
        return None
    sizes = ndimage.sum(detail, labels, index=np.arange(1, n + 1))
    ys, xs = ndimage.find_objects(labels)[int(np.argmax(sizes))]
    if (ys.stop - ys.start) * (xs.stop - xs.start) >= CONTENT_MAX * flat.size:
        return None
    box = (round(xs.start * scale), round(ys.start * scale), round(xs.stop * scale), round(ys.stop * scale))
    return box if box[2] - box[0] >= 16 and box[3] - box[1] >= 16 else None


def compute_hashes(img) -> np.ndarray:
    """RGB PIL image -> uint8 array (N_HASHES, CODE_BYTES), rows as in ROWS."""
    from PIL import ImageOps

    gray = img.convert("L")
    box = trim_box(gray)
    trimmed = gray.crop(box)
    inner = content_box(trimmed)
    if inner is not None:
        # the query rows and their crops are of the content box. A small box is a photo in a
        # template: the mirror rows mirror it. A large one is more likely a photo with flat parts:
        # its whole frame stays in the mirror rows (never queried) so that its copies find it.
        photo = trimmed.crop(inner)
        content = _frame_hashes(photo)
        small = (inner[2] - inner[0]) * (inner[3] - inner[1]) < TEMPLATE_BOX * trimmed.width * trimmed.height
        return np.stack(content + _frame_hashes(ImageOps.mirror(photo) if small else gray) + content[:1])
    rows = _frame_hashes(gray) + _frame_hashes(ImageOps.mirror(gray))
    rows.append(rows[0] if box == (0, 0, *gray.size) else _frame_hashes(gray.crop(box), crops=(1.0,))[0])
    return np.stack(rows)


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
    """keys[i] (sorted, unique) has codes[i] of shape (N_HASHES, CODE_BYTES) -> edges, neighbours.

    A pair's distance is the smallest over (full frame of one, any crop of the other). Edges:
    pairs within ``max_bits``. Neighbours: each sample's nearest other sample among its range
    hits and k-NN (ties -> the smaller key), whatever the threshold, so it can move later.
    """
    n, per = len(keys), N_HASHES
    if n < 2:
        return [], []
    db = np.ascontiguousarray(codes.reshape(n * per, CODE_BYTES))
    index = build_index(db, exact_below, nprobe, seed)
    queries = np.ascontiguousarray(codes[:, QUERY_ROWS].reshape(n * len(QUERY_ROWS), CODE_BYTES))
    q, j, d = _candidates(index, queries, max_bits)
    lo, hi, dist = _best_per_pair(q // len(QUERY_ROWS), j // per, d, n)
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
    size = N_HASHES * CODE_BYTES
    good, seen = [], set()
    for key, code in sorted(items):
        if len(code) != size:
            log.warning("phash: %s has %d code bytes, expected %d; skipped", key, len(code), size)
            beam.metrics.Metrics.counter("phash", "bad_code_size").inc()
        elif key not in seen:  # a key repeated across shards: its first (smallest) code wins
            seen.add(key)
            good.append((key, code))
    codes = np.frombuffer(b"".join(c for _, c in good), dtype=np.uint8).reshape(len(good), N_HASHES, CODE_BYTES)
    return [k for k, _ in good], codes


def _search(items: list[tuple[str, bytes]], max_bits: int, exact_below: int, nprobe: int, seed: int) -> Iterator:
    keys, codes = stack_codes(items)
    edges, neighbours = find_copy_pairs(keys, codes, max_bits, exact_below, nprobe, seed)
    log.info("phash: %d samples, %d copy pairs", len(keys), len(edges))
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
