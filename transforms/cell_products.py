"""Products inside one cell of the search (``transforms.cell_search``), at about half the
multiplications: a cell's products are symmetric, so each pair is multiplied once (the upper
triangle, in blocks of rows against the columns from the block's first row on). A product's value
does not depend on the block it is computed in (the same dot product, summed in the same order)
and x_i . x_j = x_j . x_i bit for bit, so every result is the full matrix's. Blocks are never
thin: a product of a few rows or columns may be computed by another BLAS kernel, which sums in
another order (MKL here: 3 rows or fewer, or 8 columns or fewer).
"""

from __future__ import annotations

import numpy as np

SYMMETRIC_ROWS = 256  # bf16 cells of 2 blocks and more: the upper triangle only (the lower copied)
SHAPE_STEP = 64  # bf16 products' sides: multiples of this (zero rows added), so their shapes repeat
DENSE_MIN_SIDE = 16  # a dense re-check multiplies at least this many rows and columns
FP32_ROWS = 128  # fp32 cells: rows a block (128: 7% faster than 256, 17% than 384 on 1M cells)


def row_blocks(m: int, rows: int) -> list[tuple[int, int]]:
    """(start, end) of blocks of ``rows`` rows, the last one at least half that (a product of a
    few rows may be computed by another kernel, which sums in another order)."""
    starts = list(range(0, m, rows))
    if len(starts) > 1 and m - starts[-1] < rows // 2:
        starts.pop()
    return list(zip(starts, starts[1:] + [m], strict=True))


def symmetric_product(x, rows: int = 0):
    """x @ x.T, computed for the upper triangle only (blocks of rows against the columns from the
    block's first row on), the lower triangle copied from it: the same values (a product's value
    does not depend on the block it is computed in, and x_i . x_j = x_j . x_i bit for bit). The
    rows are padded with zero rows to a multiple of ``SHAPE_STEP``: oneDNN makes a kernel for
    each new product shape (~0.5 ms CPU, as much as a 256-row block's product of a 1,100-row
    cell), and the cells' sizes all differ; so padded, the blocks' shapes come from a few dozen."""
    import torch

    m = len(x)
    pad = -m % SHAPE_STEP
    if pad:
        x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
    out = torch.empty((m + pad, m + pad), dtype=x.dtype)
    for s, e in row_blocks(m + pad, rows or SYMMETRIC_ROWS):
        out[s:e, s:] = x[s:e] @ x[s:].T
        out[e:, s:e] = out[s:e, e:].T
    return out[:m, :m] if pad else out


def block_hits(sims, best, s: int, floor: float) -> np.ndarray:
    """(row, col) cell indices of the block's similarities >= floor with col > row. Only rows
    whose best similarity reaches the floor are scanned (most rows have no duplicate)."""
    import torch

    rows = torch.nonzero(best >= floor)[:, 0]
    if not len(rows):
        return np.empty((0, 2), np.int64)
    hit = torch.nonzero(sims[rows] >= floor).numpy()
    hit[:, 0] = rows.numpy()[hit[:, 0]] + s
    return hit[hit[:, 1] > hit[:, 0]]


def dense_recheck(x, hit: np.ndarray):
    """fp32 products of many pairs i < j (rows of x (m, d), by row) as entries of products of the
    rows and the columns that have pairs (a block's rows without a candidate, most of them, are
    not multiplied again; blocks of rows only against the later columns): the same values as the
    block's full product. None when either side is thin (a product of a few rows or columns may
    sum in another order)."""
    rows, cols = np.unique(hit[:, 0]), np.unique(hit[:, 1])
    if min(len(rows), len(cols)) < DENSE_MIN_SIDE:
        return None
    out = np.empty(len(hit), dtype=np.float32)
    for a, b in row_blocks(len(rows), SYMMETRIC_ROWS):  # hits come by row: j > i, no column below
        lo, hi = np.searchsorted(hit[:, 0], [rows[a], rows[b - 1] + 1])
        c0 = min(np.searchsorted(cols, rows[a], side="right"), len(cols) - DENSE_MIN_SIDE)
        part = x[rows[a:b]] @ x[cols[c0:]].T
        at_row = np.searchsorted(rows[a:b], hit[lo:hi, 0])
        at_col = np.searchsorted(cols[c0:], hit[lo:hi, 1])
        out[lo:hi] = part[at_row, at_col].numpy()
    return out


def fp32_triangle(x, threshold: float, rows: int = 0):
    """``search_cell`` of one fp32 embedding per row, at half the products: blocks of rows against
    the columns from the block's first row on (a pair's product is computed once, for the upper
    triangle; each block's column maxima are the lower triangle's row maxima). A product's value
    is the full matrix's, bit for bit (the same dot product in the same order; symmetric), and the
    nearest neighbour is the first of equal maxima, as a maximum over the full row gives."""
    import torch

    m = len(x)
    best = torch.full((m,), -np.inf)
    nn = torch.zeros(m, dtype=torch.int64)
    pairs, sims = [], []
    with torch.inference_mode():
        for s, e in row_blocks(m, rows or FP32_ROWS):
            block = x[s:e] @ x[s:].T  # rows s..e against columns s..m
            r = torch.arange(e - s)
            block[r, r] = -np.inf
            top, col = block.max(dim=1)  # columns >= s: later than any seen for these rows
            take = top > best[s:e]
            best[s:e] = torch.where(take, top, best[s:e])
            nn[s:e] = torch.where(take, col + s, nn[s:e])
            if e < m:  # rows e..m against columns s..e (their earlier columns: ties keep the older)
                value, row = block[:, e - s :].max(dim=0)
                take = value > best[e:]
                best[e:] = torch.where(take, value, best[e:])
                nn[e:] = torch.where(take, row + s, nn[e:])
            hit = block_hits(block, top, 0, threshold)  # block coordinates, column > row
            pairs.append(hit + s), sims.append(block[hit[:, 0], hit[:, 1]].numpy())
    hit = np.concatenate(pairs)
    sim = np.concatenate(sims).astype(np.float32)
    order = pair_order(hit[:, 0], hit[:, 1], m)
    return hit[order, 0], hit[order, 1], sim[order], nn.numpy(), best.numpy()


def pair_order(i: np.ndarray, j: np.ndarray, m: int):
    """Order of pairs by (i, j): a slice when they come so already (a block's rows in order)."""
    key = i * m + j
    return slice(None) if (key[1:] > key[:-1]).all() else np.lexsort((j, i))
