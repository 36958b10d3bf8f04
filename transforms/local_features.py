"""Weight-free local-feature copy detection: ORB keypoints, visual words, geometric verification.

Global hashes miss copies whose frame changed a lot: crops anywhere, rotations, memes, the photo
inside a screenshot. Local features survive these. Per image (``extract_features``): up to
``n_features`` ORB keypoints and 256-bit descriptors on a copy at most ``side`` pixels long, plus
a small grayscale thumbnail for the photometric check. Then:

1. **Words** (``words``): each descriptor is quantised by ``tables`` data-independent hashes,
   each the values of ``word_bits`` fixed, seeded bit positions (bit-sampling LSH for Hamming
   space). Nothing is trained or gathered, so words partition the work on any runner.
2. **Candidates**: images sharing a word vote for each other. A word in more than ``max_df``
   images is a stop-word (UI chrome, meme text, watermarks, sky texture) and casts no votes; pairs
   with at least ``min_votes`` votes are candidates.
3. **Verification** (``verify``): descriptors matched with Lowe's ratio test (stop-word
   descriptors left out), a RANSAC affine fit; a pair is a copy when the fit has ``min_inliers``
   inliers, the aligned frames overlap by ``min_overlap`` of the smaller one (two burst shots of
   one scene overlap less), the aligned thumbnails agree in ``min_agreement`` of the textured
   cells they share (two photos in one meme or screenshot template agree only on the template),
   and one image's textured content lies inside the other's frame (``min_contained``: a copy is a
   part of its original or holds all of it; two shots of one scene each show what the other lacks).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import struct

import numpy as np

EMBEDDER = "orb"
THUMB = 192  # long side of the grayscale thumbnail kept for the photometric check
CELL = 6  # thumbnail cell side (pixels) for the agreement check
_HEADER = struct.Struct("<IHHHHHHHH")  # n keypoints, frame w, h, thumbnail w, h, content box


@dataclasses.dataclass(frozen=True)
class Features:
    xy: np.ndarray  # (n, 2) float32 keypoint positions in the working frame
    desc: np.ndarray  # (n, 32) uint8 ORB descriptors
    size: tuple[int, int]  # working frame (w, h)
    thumb: np.ndarray  # (th, tw) uint8 grayscale thumbnail of the whole frame
    # the photo inside a template-like image (transforms.phash.content_box), else the whole frame
    content: tuple[int, int, int, int] = (0, 0, 0, 0)

    def to_bytes(self) -> bytes:
        th, tw = self.thumb.shape
        head = _HEADER.pack(len(self.xy), *self.size, tw, th, *self.content)
        return head + self.xy.astype(np.float32).tobytes() + self.desc.tobytes() + self.thumb.tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> Features:
        n, w, h, tw, th, *content = _HEADER.unpack_from(data)
        off = _HEADER.size
        xy = np.frombuffer(data, np.float32, n * 2, off).reshape(n, 2)
        off += n * 8
        desc = np.frombuffer(data, np.uint8, n * 32, off).reshape(n, 32)
        thumb = np.frombuffer(data, np.uint8, tw * th, off + n * 32).reshape(th, tw)
        return cls(xy, desc, (w, h), thumb, tuple(content))


def extract_features(img, cfg) -> Features:
    """RGB PIL image -> ORB keypoints and descriptors on a <= cfg.side copy, and a thumbnail."""
    import cv2
    from PIL import Image

    from transforms.phash import content_box

    gray = img.convert("L")
    scale = min(1.0, cfg.side / max(gray.size))
    if max(gray.size) * scale < cfg.min_side:  # small images: upscale so FAST finds corners
        scale = cfg.min_side / max(gray.size)
    size = (max(1, round(gray.width * scale)), max(1, round(gray.height * scale)))
    work = np.asarray(gray.resize(size, Image.Resampling.BILINEAR) if size != gray.size else gray)
    orb = cv2.ORB_create(nfeatures=cfg.n_features, fastThreshold=cfg.fast_threshold, edgeThreshold=19, patchSize=19)
    kps, desc = orb.detectAndCompute(work, None)
    if desc is None:
        kps, desc = (), np.zeros((0, 32), np.uint8)
    xy = np.array([k.pt for k in kps], dtype=np.float32).reshape(-1, 2)
    t = THUMB / max(size)
    thumb = np.asarray(gray.resize((max(1, round(size[0] * t)), max(1, round(size[1] * t))), Image.Resampling.BOX))
    box = content_box(gray)
    content = (0, 0, *size) if box is None else tuple(min(size[i % 2], round(v * scale)) for i, v in enumerate(box))
    return Features(xy, np.ascontiguousarray(desc, dtype=np.uint8), size, thumb, content)


FLIP_RATE = 0.08  # share of descriptor bits an edit flips (ORB on the hard set's copies)


def vocabulary(cfg, n_images: int) -> tuple[int, int]:
    """(tables, word_bits) for a collection of ``n_images``. A word's expected occupancy is
    n_images x n_features / 2^word_bits: past ``cfg.vocabulary_images`` each doubling of the
    collection adds a bit (or every word becomes a stop-word), and tables grow so that a copy's
    descriptor still shares a word in at least one table as often as at the configured size."""
    if not cfg.vocabulary_images or n_images <= cfg.vocabulary_images:
        return cfg.tables, cfg.word_bits
    bits = min(40, cfg.word_bits + math.ceil(math.log2(n_images / cfg.vocabulary_images)))
    hit = lambda b: (1 - FLIP_RATE) ** b  # noqa: E731  (a descriptor keeps one table's word)
    tables = math.ceil(cfg.tables * math.log1p(-hit(cfg.word_bits)) / math.log1p(-hit(bits)))
    return min(64, tables), bits


@functools.lru_cache(maxsize=8)
def _word_bits(tables: int, word_bits: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.choice(256, word_bits, replace=False) for _ in range(tables)])


def words(desc: np.ndarray, tables: int, word_bits: int, seed: int = 0) -> np.ndarray:
    """(n, 32) descriptors -> (n, tables) int64 word ids: table index in the high bits."""
    if len(desc) == 0:
        return np.zeros((0, tables), np.int64)
    bits = np.unpackbits(desc, axis=1)
    pos = _word_bits(tables, word_bits, seed)
    weights = (1 << np.arange(word_bits, dtype=np.int64))[::-1]
    value = np.stack([bits[:, p].astype(np.int64) @ weights for p in pos], axis=1)
    return value | (np.arange(tables, dtype=np.int64) << 40)[None, :]


def _match(a: Features, b: Features, ratio: float, keep_a, keep_b) -> np.ndarray:
    """Ratio-test matches a -> b as (m, 2) index pairs, among the kept (non-stop-word) descriptors."""
    import cv2

    ia, ib = np.flatnonzero(keep_a), np.flatnonzero(keep_b)
    if len(ia) < 2 or len(ib) < 2:
        return np.zeros((0, 2), np.int64)
    knn = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(a.desc[ia], b.desc[ib], k=2)
    out = [
        (ia[m.queryIdx], ib[m.trainIdx]) for m, n in (p for p in knn if len(p) == 2) if m.distance < ratio * n.distance
    ]
    return np.array(out, dtype=np.int64).reshape(-1, 2)


def _polygon_area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def _overlap(m: np.ndarray, a: Features, b: Features) -> float:
    """Area of b's frame mapped by affine m into a's frame, intersected with a's frame, over the
    smaller of the two areas (1.0: one frame lies inside the other)."""
    import cv2

    wa, ha = a.size
    wb, hb = b.size
    frame_a = np.array([[0, 0], [wa, 0], [wa, ha], [0, ha]], np.float32)
    corners = np.array([[0, 0], [wb, 0], [wb, hb], [0, hb]], np.float32)
    frame_b = (corners @ m[:, :2].T + m[:, 2]).astype(np.float32)
    if cv2.contourArea(frame_b, oriented=True) < 0:
        frame_b = frame_b[::-1].copy()
    inter, _ = cv2.intersectConvexConvex(frame_a, frame_b)
    smaller = min(wa * ha, _polygon_area(frame_b))
    return float(inter) / smaller if smaller > 0 else 0.0


def _box_mask(f: Features, scale: float) -> np.ndarray:
    """f's content box on its thumbnail, as a float mask."""
    mask = np.zeros(f.thumb.shape, np.float32)
    x0, y0, x1, y1 = f.content if f.content[2] > 0 else (0, 0, *f.size)
    mask[round(y0 * scale) : round(y1 * scale), round(x0 * scale) : round(x1 * scale)] = 1.0
    return mask


def _agreement(m: np.ndarray, a: Features, b: Features, inliers=None, min_cells: int = 0) -> tuple[float, int]:
    """Warp b's thumbnail onto a's (affine m maps b's frame to a's); -> share of a's textured
    cells inside the warp whose zero-mean correlation with b's is > 0.5, and how many cells.

    The cells holding an ``inliers`` point (a's frame), and their neighbours, are left out when ``min_cells`` others
    remain: the keypoints already matched there, so they are no independent evidence. Two photos
    under one meme caption match on its letters (the bars are flat), and the letters' cells
    would outvote a dark photo's few textured ones."""
    import cv2

    sa = a.thumb.shape[1] / a.size[0]
    sb = b.thumb.shape[1] / b.size[0]
    mt = m.copy()
    mt[:, :2] *= sa / sb
    mt[:, 2] *= sa
    th, tw = a.thumb.shape
    warped = cv2.warpAffine(b.thumb.astype(np.float32), mt, (tw, th), flags=cv2.INTER_LINEAR, borderValue=-1)
    # only the photo counts: the cells inside both content boxes (a template's chrome is not the copy)
    valid = cv2.warpAffine(_box_mask(b, sb), mt, (tw, th), flags=cv2.INTER_NEAREST) > 0.5
    valid &= _box_mask(a, sa) > 0.5
    ny, nx = th // CELL, tw // CELL

    def cells(x: np.ndarray) -> np.ndarray:
        return x[: ny * CELL, : nx * CELL].reshape(ny, CELL, nx, CELL).transpose(0, 2, 1, 3).reshape(ny, nx, -1)

    inside = cells(valid).all(axis=2)
    if inliers is not None and len(inliers):
        near = np.zeros((ny, nx), bool)
        cx = np.clip((inliers[:, 0] * sa // CELL).astype(int), 0, nx - 1)
        cy = np.clip((inliers[:, 1] * sa // CELL).astype(int), 0, ny - 1)
        near[cy, cx] = True
        near = cv2.dilate(near.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0  # and their neighbours
        if int((inside & ~near).sum()) >= min_cells:
            inside &= ~near
    p, q = cells(a.thumb.astype(np.float32))[inside], cells(warped)[inside]
    p, q = p - p.mean(axis=1, keepdims=True), q - q.mean(axis=1, keepdims=True)
    sp, sq = np.sqrt((p * p).mean(axis=1)), np.sqrt((q * q).mean(axis=1))
    textured = (sp >= 4.0) & (sq >= 4.0)  # flat (or blurred flat) on either side says nothing
    zncc = (p * q).mean(axis=1)[textured] / (sp[textured] * sq[textured])
    total = int(textured.sum())
    agree = int((zncc > 0.5).sum())
    return (agree / total if total else 0.0), total


def _coverage(f: Features, xy: np.ndarray, grid: int = 4) -> float:
    """Share of the textured blocks of f (a grid x grid split of its frame) holding an inlier.
    Two photos in one template match only on the template: the photo's blocks hold none."""
    th, tw = f.thumb.shape
    sx, sy = f.size[0] / grid, f.size[1] / grid
    hit = np.zeros((grid, grid), bool)
    cx = np.clip((xy[:, 0] // sx).astype(int), 0, grid - 1)
    cy = np.clip((xy[:, 1] // sy).astype(int), 0, grid - 1)
    hit[cy, cx] = True
    textured = np.zeros((grid, grid), bool)
    for i in range(grid):
        for j in range(grid):
            block = f.thumb[i * th // grid : (i + 1) * th // grid, j * tw // grid : (j + 1) * tw // grid]
            textured[i, j] = block.size > 0 and float(block.std()) > 12.0
    return float((hit & textured).sum()) / max(1, int(textured.sum()))


def _content_cells(f: Features) -> np.ndarray:
    """Centres (working frame) of f's textured thumbnail cells inside its content box."""
    th, tw = f.thumb.shape
    ny, nx = th // CELL, tw // CELL
    std = f.thumb[: ny * CELL, : nx * CELL].astype(np.float32).reshape(ny, CELL, nx, CELL).std(axis=(1, 3))
    yy, xx = np.nonzero(std >= 4.0)
    s = f.size[0] / max(1, tw)
    pts = np.c_[(xx + 0.5) * CELL * s, (yy + 0.5) * CELL * s]
    x0, y0, x1, y1 = f.content if f.content[2] > 0 else (0, 0, *f.size)
    return pts[(pts[:, 0] >= x0) & (pts[:, 0] < x1) & (pts[:, 1] >= y0) & (pts[:, 1] < y1)]


def _share_inside(pts: np.ndarray, m: np.ndarray, size: tuple[int, int]) -> float:
    if not len(pts):
        return 0.0
    q = pts @ m[:, :2].T + m[:, 2]
    return float(((q[:, 0] >= 0) & (q[:, 0] < size[0]) & (q[:, 1] >= 0) & (q[:, 1] < size[1])).mean())


def _contained(m: np.ndarray, a: Features, b: Features) -> float:
    """The larger of: the share of b's textured content cells that m maps inside a's frame, and
    of a's inside b's. A copy is part of its original (a crop) or holds all of it (a border, a
    meme, a screenshot): one side's content lies in the other (>= 0.94 on the hard set). Two
    shots of one scene each show some of it that the other lacks (a Flickr burst pair: 0.84)."""
    import cv2

    return max(
        _share_inside(_content_cells(b), m, a.size),
        _share_inside(_content_cells(a), cv2.invertAffineTransform(m), b.size),
    )


@dataclasses.dataclass(frozen=True)
class Verdict:
    copy: bool
    inliers: int
    overlap: float
    agreement: float
    coverage: float = 0.0
    contained: float = 0.0


@dataclasses.dataclass(frozen=True)
class Alignment:
    """A candidate pair's RANSAC affine fit that passed the geometric checks: m maps b's frame to
    a's; src / dst are the inliers in b's / a's frame."""

    m: np.ndarray  # (2, 3) float64
    src: np.ndarray  # (k, 2) float32
    dst: np.ndarray  # (k, 2) float32
    overlap: float

    def to_bytes(self) -> bytes:
        head = struct.pack("<I6dd", len(self.src), *self.m.ravel().tolist(), self.overlap)
        return head + self.src.astype(np.float32).tobytes() + self.dst.astype(np.float32).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> Alignment:
        n, *rest = struct.unpack_from("<I6dd", data)
        off = struct.calcsize("<I6dd")
        src = np.frombuffer(data, np.float32, n * 2, off).reshape(n, 2)
        dst = np.frombuffer(data, np.float32, n * 2, off + n * 8).reshape(n, 2)
        return cls(np.array(rest[:6]).reshape(2, 3), src, dst, rest[6])


def align(a: Features, b: Features, cfg, keep_a=None, keep_b=None) -> Alignment | Verdict:
    """The geometric half of ``verify`` (descriptors and keypoints only): an Alignment, or the
    rejecting Verdict."""
    import cv2

    keep_a = np.ones(len(a.desc), bool) if keep_a is None else keep_a
    keep_b = np.ones(len(b.desc), bool) if keep_b is None else keep_b
    pairs = _match(a, b, cfg.ratio, keep_a, keep_b)
    if len(pairs) < cfg.min_inliers:
        return Verdict(False, 0, 0.0, 0.0)
    src, dst = b.xy[pairs[:, 1]], a.xy[pairs[:, 0]]
    m, mask = cv2.estimateAffine2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=cfg.ransac_px, maxIters=2000)
    inliers = int(mask.sum()) if mask is not None else 0
    if m is None or inliers < cfg.min_inliers:
        return Verdict(False, inliers, 0.0, 0.0)
    sv = np.linalg.svd(m[:, :2], compute_uv=False)
    if np.linalg.det(m[:, :2]) <= 0 or sv[1] < 1e-3 or sv[0] / sv[1] > cfg.max_anisotropy:
        return Verdict(False, inliers, 0.0, 0.0)  # a mirror, a collapse or a shear no copy has
    overlap = _overlap(m, a, b)
    if overlap < cfg.min_overlap:
        return Verdict(False, inliers, overlap, 0.0)
    inl = mask.ravel().astype(bool)
    return Alignment(m, src[inl], dst[inl], overlap)


def confirm(al: Alignment, a: Features, b: Features, cfg) -> Verdict:
    """The photometric half of ``verify`` (thumbnails and content boxes only)."""
    import cv2

    m, src, dst = al.m, al.src, al.dst
    # agreement in the frame of the image the other lies inside: its thumbnail is the coarser one
    # there, so the finer one is only ever downsampled onto it (no blur mismatch)
    area_b_in_a = abs(np.linalg.det(m[:, :2])) * b.size[0] * b.size[1]
    if area_b_in_a > a.size[0] * a.size[1]:
        agreement, cells = _agreement(cv2.invertAffineTransform(m), b, a, src, cfg.min_cells)
        coverage = _coverage(a, dst)  # a lies inside b: a's blocks must hold inliers
    else:
        agreement, cells = _agreement(m, a, b, dst, cfg.min_cells)
        coverage = _coverage(b, src)
    contained = _contained(m, a, b)
    ok = cells >= cfg.min_cells and agreement >= cfg.min_agreement and coverage >= cfg.min_coverage
    ok = ok and contained >= cfg.min_contained
    return Verdict(ok, len(src), al.overlap, agreement, coverage, contained)


def verify(a: Features, b: Features, cfg, keep_a=None, keep_b=None) -> Verdict:
    """Geometric and photometric verification of one candidate pair."""
    al = align(a, b, cfg, keep_a, keep_b)
    return al if isinstance(al, Verdict) else confirm(al, a, b, cfg)
