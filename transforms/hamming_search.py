"""Exact all-pairs search of packed binary codes inside one cell, in integers.

The in-cell search for perceptual hashes (``transforms.phash``): each row is an image's H packed
codes (H, BYTES); a pair's similarity is the best over (a query row of one, any row of the
other), both ways. As ``transforms.cell_search.search_cell`` computes it with +/-1 float vectors,
but cheaper:

- products of +/-1 int8 vectors (``torch._int_mm``, VNNI where the CPU has it; fp32 where int8
  products are missing), exact integers ``BITS - 2 * hamming``, so no re-check is needed;
- a query row equal to an earlier query row of the same image (the trimmed frame of an
  untrimmed photo is its frame) is left out: it changes no maximum;
- image tiles are compared once per unordered pair of tiles: A's query rows x all of B's rows,
  then B's query rows x A's rows that are not query rows (query x query is in the first); one
  product per target hash row, folded into a running maximum while it is in cache, on one
  thread (the maxima are memory-bound: a second thread on a busy core made them 5-20x slower).

At 8,250 Flickr-like images (7 hashes, 2 query rows) this is ~1.5 s on one core where the bf16
float search took ~14 s; the cost grows as n^2 (one cell: n <= ``single_cell_below``).

Same contract and results as ``search_cell``: pairs i < j at or above the threshold, each row's
nearest other row (ties: the smaller index).
"""

from __future__ import annotations

import functools

import numpy as np

TILE = 512  # images per tile side: a product is (TILE x TILE) int32, 1 MB, in cache
NONE = np.iinfo(np.int32).min


@functools.cache
def int8_products() -> bool:
    """True where ``torch._int_mm`` multiplies int8 matrices on the CPU (exactly)."""
    import torch

    try:
        a = torch.tensor([[1, -1] * 8] * 17, dtype=torch.int8)
        return int(torch._int_mm(a, a.T.contiguous())[0, 0]) == 16
    except Exception:  # an older torch, or no CPU kernel
        return False


def signs(packed: np.ndarray):
    """(n, BYTES) packed bits -> torch (n, BITS) +/-1 in int8 (float32 without int8 products)."""
    import torch

    bits = np.unpackbits(np.ascontiguousarray(packed, dtype=np.uint8), axis=-1).astype(np.int8)
    out = torch.from_numpy(bits * 2 - 1)
    return out if int8_products() else out.float()


def _product(a, bt):
    """(n, BITS) x (BITS, k) -> (n, k) int32 exact dot products."""
    import torch

    if a.dtype == torch.int8:
        return torch._int_mm(a, bt)
    return (a @ bt).round().int()


def distinct_rows(codes: np.ndarray, rows) -> list[tuple[int, np.ndarray]]:
    """Per hash row r of ``rows``: the images whose row r differs from each earlier row listed
    (the first row: every image)."""
    out = []
    for n, r in enumerate(rows):
        keep = np.ones(len(codes), dtype=bool)
        for r0 in rows[:n]:
            keep &= (codes[:, r] != codes[:, r0]).any(axis=1)
        out.append((r, np.flatnonzero(keep)))
    return out


class _Queries:
    """Signed query vectors per block of images: each query row as a slab of the images whose
    row it is not a repeat of (the first query row: every image)."""

    def __init__(self, codes: np.ndarray, rows):
        self.codes, self.parts = codes, distinct_rows(codes, rows)

    def block(self, a: int, b: int) -> list:
        """Images [a, b) -> [(local positions, (n, BITS) vectors)] per slab with any."""
        out = []
        for r, idx in self.parts:
            lo, hi = np.searchsorted(idx, [a, b])
            if hi > lo:
                out.append((idx[lo:hi] - a, signs(self.codes[idx[lo:hi], r])))
        return out


def targets(codes: np.ndarray, a: int, b: int) -> list:
    """Every hash row of images [a, b), one (BITS, n) matrix per row (transposed for products)."""
    return [signs(codes[a:b, r]).T.contiguous() for r in range(codes.shape[1])]


def _best_dots(queries: list, target: list, n_t: int):
    """Query slabs (the first holds every image, in order) x one tile's target matrices ->
    (n_q, n_t) int32: per image pair, the largest product of a query row and any target row.
    One product per target row, folded into the running maximum while it is in cache."""
    import torch

    best = None
    for pos, vecs in queries:
        red = _product(vecs, target[0])
        for t in target[1:]:
            torch.maximum(red, _product(vecs, t), out=red)
        if best is None:
            best = red
        else:
            rows = torch.from_numpy(pos)
            best[rows] = torch.maximum(best[rows], red)
    return best


def _update(best_val, best_idx, rows: np.ndarray, vals: np.ndarray, idx: np.ndarray) -> None:
    """Keep the larger value per row; ties -> the smaller index."""
    cur_v, cur_i = best_val[rows], best_idx[rows]
    better = (vals > cur_v) | ((vals == cur_v) & (idx < cur_i))
    best_val[rows[better]] = vals[better]
    best_idx[rows[better]] = idx[better]


def search_codes(codes: np.ndarray, query_rows, threshold: float, tile: int = TILE):
    """Packed codes of one cell (m, H, BYTES) -> (i, j, sim) pairs i < j with sim >= threshold,
    and each row's nearest other row (index, sim); sim = 1 - 2 * hamming / BITS as in
    ``transforms.cell_search.search_cell``. Ties -> the smaller index."""
    import torch

    codes = np.asarray(codes, dtype=np.uint8)
    m, h, nbytes = codes.shape
    bits = nbytes * 8
    q = [r for r in query_rows if r < h] or [0]
    need = int(np.ceil(threshold * bits - 1e-6))  # dot = bits - 2 hamming is an integer
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # memory-bound maxima: a second thread on a busy core costs 5-20x
    try:
        return _search(codes, q, need, bits, tile)
    finally:
        torch.set_num_threads(threads)


def _search(codes: np.ndarray, q: list, need: int, bits: int, tile: int):
    import torch

    m = len(codes)
    rest = [r for r in range(codes.shape[1]) if r not in q]
    found = _Queries(codes, q)
    queries = {a: found.block(a, min(m, a + tile)) for a in range(0, m, tile)}
    cache: dict = {}  # target matrices of the blocks to the right of the current one
    best_val = np.full(m, NONE, dtype=np.int64)
    best_idx = np.full(m, -1, dtype=np.int64)
    pi, pj, pd = [], [], []
    with torch.inference_mode():
        for a in range(0, m, tile):
            b = min(m, a + tile)
            qa, ta = queries[a], cache.pop(a, None)
            ta = targets(codes, a, b) if ta is None else ta
            for c in range(a, m, tile):
                d = min(m, c + tile)
                if c not in cache and c != a:
                    cache[c] = targets(codes, c, d)
                fwd = _best_dots(qa, ta if c == a else cache[c], d - c)
                if c == a:
                    sim = torch.maximum(fwd, fwd.T)
                elif len(rest):  # A <- B: B's query rows x A's other rows (query x query is in fwd)
                    sim = torch.maximum(fwd, _best_dots(queries[c], [ta[r] for r in rest], b - a).T)
                else:
                    sim = fwd
                if c == a:
                    sim.fill_diagonal_(NONE)
                hit = torch.nonzero(sim >= need).numpy()
                if c == a:
                    hit = hit[hit[:, 1] > hit[:, 0]]
                pi.append(hit[:, 0] + a), pj.append(hit[:, 1] + c)
                pd.append(sim[hit[:, 0], hit[:, 1]].numpy())
                vals, idx = sim.max(dim=1)  # the first of equal maxima: the smaller index
                _update(best_val, best_idx, np.arange(a, b), vals.numpy().astype(np.int64), idx.numpy() + c)
                if c != a:
                    vals, idx = sim.max(dim=0)
                    _update(best_val, best_idx, np.arange(c, d), vals.numpy().astype(np.int64), idx.numpy() + a)
    i, j = np.concatenate(pi).astype(np.int64), np.concatenate(pj).astype(np.int64)
    dots = np.concatenate(pd).astype(np.float32)
    order = np.lexsort((j, i))
    sim = (dots[order] / bits).astype(np.float32)
    nn_sim = np.where(best_idx >= 0, best_val / bits, np.nan).astype(np.float32)
    return i[order], j[order], sim, best_idx, nn_sim


def search_cell(codes: np.ndarray, query_rows, threshold: float, bf16=None):
    """``transforms.cell_search.search_cell``'s signature for packed codes (``bf16`` unused)."""
    return search_codes(codes, query_rows, threshold)
