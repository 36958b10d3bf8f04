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
# the hash rows of one image: the frame and its centre crops, the same mirrored (a flipped copy's
# frame lands on them), and the frame inside trimmed borders (a letterboxed or padded copy's
# trimmed frame lands on the original's frame).
ROWS = tuple(f"{m}{c}" for m in ("", "mirror:") for c in CROPS) + ("trimmed",)
N_HASHES = len(ROWS)
QUERY_ROWS = (0, N_HASHES - 1)  # rows searched against every row of the others: the frame, trimmed or not
HASH_VERSION = 4  # bump when the rows change: cached codes of another version are recomputed
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
BLACK = 4  # grey levels of clipped shadows
CLIPPED_SHARE = 0.5  # flats mostly black: hashed screenshots ~0.0 (<= 0.13), darkened copies ~1.0


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
    """Pixels whose window x window neighbourhood spans at most ``tol`` grey levels."""
    import cv2

    kernel = np.ones((window, window), np.uint8)
    u8 = a.astype(np.uint8)
    return (cv2.dilate(u8, kernel).astype(np.int16) - cv2.erode(u8, kernel)) <= tol


def flat_share(gray) -> float:
    """Share of pixels in a uniform patch (a TEMPLATE_WINDOW square within 2 grey levels): UI
    fills are uniform over large areas; skies, walls and JPEG-flattened blocks drift."""
    return float(_flat(_small(gray)[0], TEMPLATE_WINDOW, 2).mean())


def black_flat_share(gray) -> float:
    """Share of the uniform patches (as ``flat_share``) that are black (grey <= BLACK): a photo
    darkened until its shadows clip, not UI chrome."""
    a = _small(gray)[0]
    flat = _flat(a, TEMPLATE_WINDOW, 2)
    return float((flat & (a <= BLACK)).sum()) / max(1, int(flat.sum()))


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
        # template: the mirror rows mirror it, unless the flats are mostly black (a photo darkened
        # until its shadows clip: its copies query with their whole frame, so row 3 keeps it;
        # UI chrome is rarely pure black). A large one is more likely a photo with flat parts:
        # its whole frame stays in the mirror rows (never queried) so that its copies find it.
        photo = trimmed.crop(inner)
        content = _frame_hashes(photo)
        small = (inner[2] - inner[0]) * (inner[3] - inner[1]) < TEMPLATE_BOX * trimmed.width * trimmed.height
        if not small:
            return np.stack(content + _frame_hashes(gray) + content[:1])
        mirrored = _frame_hashes(ImageOps.mirror(photo))
        if black_flat_share(trimmed) >= CLIPPED_SHARE:
            mirrored = _frame_hashes(gray, crops=CROPS[:1]) + mirrored[:2]
        return np.stack(content + mirrored + content[:1])
    rows = _frame_hashes(gray) + _frame_hashes(ImageOps.mirror(gray))
    rows.append(rows[0] if box == (0, 0, *gray.size) else _frame_hashes(gray.crop(box), crops=(1.0,))[0])
    return np.stack(rows)


def hamming_threshold(max_hamming: int) -> int:
    """Config ``max_hamming`` is in 64-bit units (the usual pHash scale); scale it to BITS."""
    return int(round(max_hamming * BITS / 64))


def code_vectors(codes: np.ndarray) -> np.ndarray:
    """(m, H, CODE_BYTES) packed codes -> (m, H, BITS) float32 +/-1/16: the inner product of two
    hashes is 1 - 2 * hamming / BITS, exact in bf16 and fp32."""
    bits = np.unpackbits(np.asarray(codes, dtype=np.uint8), axis=-1).astype(np.float32)
    return (bits * 2.0 - 1.0) / np.sqrt(BITS)


def packed_codes(codes: np.ndarray) -> np.ndarray:
    """Codes as the in-cell search takes them (``transforms.hamming_search``): packed uint8."""
    return np.asarray(codes, dtype=np.uint8)


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
    from transforms import cell_search, hamming_search

    if len(keys) < 2:
        return [], []
    if cell_search.choose_cells(len(keys), single_cell_below, n_cells) == 1:  # exact, in integers
        one = np.zeros((len(keys), 1), dtype=np.int32)
        found = cell_search.search_group(
            np.asarray(keys),
            codes,
            one,
            0,
            1,
            query_rows(),
            cosine_threshold(max_bits),
            cell_fn=hamming_search.search_cell,
        )
    else:
        found = cell_search.search_in_memory(
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
    bounded sample, rows shuffled by cell as arrays, exact products inside each cell (of packed
    codes in integers: ``transforms.hamming_search``). One cell (exact) up to
    ``single_cell_below`` samples.
    """

    def __init__(self, cfg, seed: int = 0):
        super().__init__()
        self.max_bits = hamming_threshold(cfg.max_hamming)
        self.settings = SearchSettings(single_cell_below=min(cfg.exact_below, SearchSettings.single_cell_below))
        self.seed = seed

    def expand(self, codes):
        from transforms import hamming_search
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
            cell_fn=hamming_search.search_cell,
            search_vectorize=packed_codes,
        )
