"""Partitioned near-duplicate search over rows of vectors: columnar, one cell at a time.

Every row is a key and a small stack of vectors (m, H, d): H = 1 for embeddings; for perceptual
hashes each of an image's H hashes as a +/-1/16 vector, so the inner product is 1 - 2*hamming/256.
``query_rows`` are the rows compared against every row of the other sample (a pair's similarity is
the best over (query row of one, any row of the other), both ways).

The plan (``transforms.cell_plan``): spherical k-means centroids trained on a bounded sample; each
row goes to the cell of the centroid nearest to each of its query vectors, and to the
second-nearest one too when that is within ``margin`` of the first. Rows are shuffled by cell
group and compared inside each cell with dense products (bf16 where the CPU has native bf16, then
an fp32 re-check of every pair near the threshold, so the decisions are fp32's). One embedding a
row: a cell's products are symmetric, so each pair is multiplied once (the upper triangle, in
blocks of rows); a product's value does not depend on the block it is computed in, so the results
are the full matrix's bit for bit (1M LAION-layout rows, 4 captured cell groups: 40% less CPU
than the full products, the same pairs, similarities and neighbours). A pair that
shares several cells is reported only by the smallest cell they share, so no global
de-duplication is needed. At or below ``single_cell_below`` rows there is one cell and the search
is exact.

Functions take and return numpy arrays; the Beam wiring is ``transforms.ann_edges.CellSearch``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from transforms import cell_products
from transforms.cell_plan import (  # noqa: F401  (the plan's names, as callers know them)
    BF16_EPS,
    Plan,
    assign,
    bf16_native,
    choose_cells,
    groups_of,
    key_priority,
    make_plan,
    sample_rows,
)

NN_CANDIDATES = 4  # bf16 top candidates re-scored in fp32 for each row's nearest neighbour
BF16_MIN_ROWS = 1024  # smaller cells: fp32 (bf16 conversion and re-checks cost more than they save)
SEARCH_THREADS = int(os.environ.get("MEMSIEVE_SEARCH_THREADS", min(2, os.cpu_count() or 1)))  # cells at once
DENSE_RECHECK = 50  # a block with more than 1/50 of its products near the threshold is re-done in fp32


def owner_cell(cells_a: np.ndarray, cells_b: np.ndarray) -> np.ndarray:
    """The smallest cell two rows share (-1: none): the one cell that reports their pair."""
    big = np.iinfo(np.int32).max
    best = np.full(len(cells_a), big, dtype=np.int64)
    for i in range(cells_a.shape[1]):
        for j in range(cells_b.shape[1]):
            same = (cells_a[:, i] == cells_b[:, j]) & (cells_a[:, i] >= 0)
            best = np.where(same, np.minimum(best, cells_a[:, i]), best)
    return np.where(best == big, -1, best)


def pair_sims(x: np.ndarray, a, b: np.ndarray, query_rows: tuple[int, ...], chunk: int = 1024):
    """fp32 similarity of pairs (a[i], b[i]) of rows of x (m, H, d): best over query x any, both
    ways. ``a`` None: every row in order (pairs (i, b[i]), no gather). Pairs go ``chunk`` at a
    time, so the gathered rows are still in cache when multiplied (1,024: 3.4x faster than 65,536
    on a 1,500-row cell's 40k pairs)."""
    out = np.empty(len(b), dtype=np.float32)
    q = list(query_rows)
    for s in range(0, len(b), chunk):
        xa, xb = x[s : s + chunk] if a is None else x[a[s : s + chunk]], x[b[s : s + chunk]]
        if x.shape[1] == 1 and q == [0]:
            out[s : s + chunk] = np.einsum("pd,pd->p", xa[:, 0], xb[:, 0])
            continue
        one = np.einsum("pqd,phd->pqh", xa[:, q], xb).max(axis=(1, 2))
        two = np.einsum("pqd,phd->pqh", xb[:, q], xa).max(axis=(1, 2))
        out[s : s + chunk] = np.maximum(one, two)
    return out


def _block_sims(queries, db, s: int, e: int, m: int, h: int, nq: int, symmetric: bool):
    """Similarities of rows s..e against all m rows of the cell (either dtype), self excluded."""
    import torch

    if symmetric and e - s == m >= 2 * cell_products.SYMMETRIC_ROWS:
        sims = cell_products.symmetric_product(db)
    elif symmetric:
        sims = queries[s:e] @ db.T
    else:
        sims = (queries[s * nq : e * nq] @ db.T).view(e - s, nq, m, h).amax(dim=(1, 3))
        back = (queries @ db[s * h : e * h].T).view(m, nq, e - s, h).amax(dim=(1, 3))
        sims = torch.maximum(sims, back.T)
    rows = torch.arange(e - s)
    sims[rows, rows + s] = -np.inf
    return sims


def search_cell(vecs: np.ndarray, query_rows: tuple[int, ...], threshold: float, bf16: bool | None = None):
    """Rows of one cell (m, H, d) -> (i, j, sim) local pairs i < j with sim >= threshold, and each
    row's nearest other row (nn index, -1 when alone; nn similarity). Ties -> the smaller index.

    After each block's matmul, one pass over it (the rows' top k); only rows whose best reaches
    the threshold are scanned for pairs. bf16 products (where native and the cell is big enough
    to gain) select candidates: pairs within ``BF16_EPS`` of the threshold, and the bf16 top
    ``NN_CANDIDATES`` of rows whose first two are that close; all are re-scored in fp32 (a block
    with many candidates by an fp32 product of the block, the others pair by pair), so decisions
    and reported similarities are fp32's."""
    import torch

    m, h, d = vecs.shape
    q = [r for r in query_rows if r < h] or [0]
    x32 = np.ascontiguousarray(vecs, dtype=np.float32)
    low = (bf16_native() and m * h >= BF16_MIN_ROWS) if bf16 is None else bf16
    k = min(NN_CANDIDATES if low else 1, m - 1)
    if k == 0:
        none = np.empty(0, np.int64)
        return none, none, np.empty(0, np.float32), np.full(m, -1, np.int64), np.full(m, np.nan, np.float32)
    t32 = torch.from_numpy(x32)
    if h == 1 and q == [0] and not low:
        return cell_products.fp32_triangle(t32.reshape(m, d), threshold)
    shape = (m, h, len(q), h == 1 and q == [0])
    queries = (lambda v: v.reshape(m, d)) if shape[3] else (lambda v: v[:, q].reshape(m * len(q), d))
    full = (queries(t32), t32.reshape(m * h, d))
    t = t32.to(torch.bfloat16) if low else t32
    fast = (queries(t), t.reshape(m * h, d)) if low else full
    eps = BF16_EPS * float(np.max(np.einsum("mhd,mhd->mh", x32, x32))) if low else 0.0
    floor = threshold - eps - (2.0**-8 if low else 0.0)  # and the floor's own rounding to bf16
    block = int(max(1, min(2048, 2**25 // max(1, m * h * len(q)))))
    loose, done, nn_cand, nn_top = [], [], [], []
    with torch.inference_mode():
        for s in range(0, m, block):
            e = min(m, s + block)
            sims = _block_sims(*fast, s, e, *shape)
            top = torch.topk(sims, k, dim=1) if k > 1 else sims.max(dim=1)
            values = top.values.reshape(e - s, k)
            nn_cand.append(top.indices.reshape(e - s, k).numpy())
            nn_top.append(values.float().numpy())
            hit = cell_products.block_hits(sims, values[:, 0], s, floor)
            if low and len(hit) * DENSE_RECHECK < (e - s) * m:
                loose.append(hit)  # few: re-scored pair by pair below
                continue
            got = cell_products.dense_recheck(full[1], hit) if low and shape[3] else None
            if got is None and low:  # many: the block again in fp32
                sims = _block_sims(*full, s, e, *shape)
            got = sims[hit[:, 0] - s, hit[:, 1]].numpy() if got is None else got
            done.append((hit[got >= threshold], got[got >= threshold]))
    if loose:
        hit = np.concatenate(loose)
        got = pair_sims(x32, hit[:, 0], hit[:, 1], tuple(q))
        done.append((hit[got >= threshold], got[got >= threshold]))
    i = np.concatenate([np.empty(0, np.int64)] + [p[:, 0] for p, _ in done]).astype(np.int64)
    j = np.concatenate([np.empty(0, np.int64)] + [p[:, 1] for p, _ in done]).astype(np.int64)
    sim = np.concatenate([np.empty(0, np.float32)] + [g for _, g in done]).astype(np.float32)
    order = cell_products.pair_order(i, j, m)
    cand, top = np.concatenate(nn_cand).astype(np.int64), np.concatenate(nn_top)
    nn, nn_sim = _nearest(x32, cand, top, tuple(q), 2 * eps) if low else (cand[:, 0], top[:, 0])
    return i[order], j[order], sim[order], nn, nn_sim


def _nearest(x32: np.ndarray, cand: np.ndarray, top: np.ndarray, q: tuple[int, ...], gap: float):
    """bf16 top candidates (m, k) and their bf16 similarities -> each row's best in fp32 (ties:
    the smaller index). A row whose first candidate leads the second by more than ``gap`` (twice
    the bf16 error) keeps it; the others re-score the candidates within ``gap`` of the first (one
    further below is below the first in fp32 too: it can neither win nor tie)."""
    m, k = cand.shape
    best = cand[:, 0].copy()
    sim = pair_sims(x32, None, best, q)
    unsure = np.flatnonzero(top[:, 0] - top[:, 1] <= gap) if k > 1 else np.empty(0, np.int64)
    if len(unsure):
        r, c = np.nonzero(top[unsure, 1:] >= top[unsure, :1] - gap)
        sims = np.full((len(unsure), k), -np.inf, dtype=np.float32)
        sims[:, 0] = sim[unsure]
        sims[r, c + 1] = pair_sims(x32, unsure[r], cand[unsure[r], c + 1], q)
        hi = sims.max(axis=1)
        best[unsure] = np.where(sims == hi[:, None], cand[unsure], np.iinfo(np.int64).max).min(axis=1)
        sim[unsure] = hi
    return best, sim.astype(np.float32)


def dedup_keys(keys: np.ndarray, vecs: np.ndarray) -> np.ndarray:
    """Row indices sorted by key, one per key (a key repeated across inputs: the first in
    (key, first vector value) order, so the choice does not depend on arrival order)."""
    if len(keys) < 2 or (keys[1:] > keys[:-1]).all():
        return np.arange(len(keys))
    order = np.argsort(keys, kind="stable")  # unique keys (the rule): the order, half a lexsort's cost
    if (keys[order][1:] != keys[order][:-1]).all():
        return order
    order = np.lexsort((vecs.reshape(len(vecs), -1)[:, 0], keys))
    first = np.ones(len(order), dtype=bool)
    first[1:] = keys[order][1:] != keys[order][:-1]
    return order[first]


def shallow_forest(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Mask of the pairs forming a breadth-first spanning forest of the n rows' graph, each tree
    rooted at its component's first row (the smallest key): the same components from at most
    n - 1 real edges (a group of 500 copies: 499, not 124,750), and trees as shallow as the
    graph allows (copies of one image: a star), which keeps the component rounds few."""
    if len(i) < 2:
        return np.ones(len(i), dtype=bool)
    pred = _pred_from_first_rows(n, i, j) if bool((i < j).all()) else None
    if pred is None:
        _, labels = _search_graph(n, i, j, None)
        roots = np.full(labels.max() + 1, n, dtype=np.int64)
        np.minimum.at(roots, labels[:n], np.arange(n))
        pred = _search_graph(n, i, j, np.sort(roots[roots < n]))
    return (pred[i] == j) | (pred[j] == i)  # a tree's edges: (parent, child) either way round


def _search_graph(n: int, i: np.ndarray, j: np.ndarray, roots):
    """``roots`` None: the components of the pairs' graph; else the predecessors of one breadth-
    first search from node n, made a virtual node above ``roots`` (ascending), so each tree is a
    search from its root alone (one sorted adjacency, rows sorted by column)."""
    from scipy.sparse import coo_matrix, csr_matrix
    from scipy.sparse.csgraph import breadth_first_order, connected_components

    graph = coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(n + 1, n + 1)).tocsr()
    if roots is None:
        return connected_components(graph, directed=False)
    indptr = graph.indptr.astype(np.int64)
    indptr[n + 1] += len(roots)
    indices = np.concatenate([graph.indices, roots])
    both = csr_matrix((np.ones(len(indices), np.int8), indices, indptr), shape=(n + 1, n + 1))
    return breadth_first_order(both, n, directed=False, return_predecessors=True)[1]


def _pred_from_first_rows(n: int, i: np.ndarray, j: np.ndarray):
    """The search's predecessors for pairs i < j, without the components pass and the pairs that
    cannot matter; None when that does not hold (then the caller does it the long way). Roots: the
    rows with no smaller neighbour (each component's first row is one). A root's neighbours are
    found first, so a pair of two of them never finds a row: dropped (a group of copies: all but
    the star's). Holds when every row is reached and no pair joins two trees: each tree is then a
    component with one root, its first row; the kept pairs keep their order in each row's list."""
    later = np.zeros(n, dtype=bool)
    later[j] = True
    roots = np.flatnonzero(~later)
    near = np.zeros(n, dtype=bool)
    near[j[~later[i]]] = True  # a root's neighbours
    keep = ~(near[i] & near[j])
    pred = _search_graph(n, i[keep], j[keep], roots)
    top = pred[:n].astype(np.int64)
    if (top < 0).any():
        return None
    top[roots] = roots
    while True:  # each row's root, by pointer jumping (shallow trees: a few rounds)
        up = top[top]
        if np.array_equal(up, top):
            break
        top = up
    return pred if bool((top[i] == top[j]).all()) else None


def _in_threads(fn, items: list, costs: list) -> Iterator:
    """``map(fn, items)`` in order, on ``SEARCH_THREADS`` threads (the in-cell work is numpy and
    torch, which release the GIL: gathers, conversions and re-checks of one cell overlap another
    cell's products). Results are the same as one thread's. Every item is in flight and the
    costliest (by ``costs``) start first (cells' costs differ 15x: taken in order, a thread that had
    finished a small cell waited for the large one before it; 4 captured 1M cell groups, simulated
    on 2 threads: 0.46 s in order, 0.38 s costliest first, 0.38 s the ideal)."""
    threads = SEARCH_THREADS if len(items) > 1 else 1
    if threads <= 1:
        yield from map(fn, items)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        futures = [None] * len(items)
        for k in sorted(range(len(items)), key=lambda k: -costs[k]):
            futures[k] = pool.submit(fn, items[k])
        for k in range(len(items)):
            yield futures[k].result()
            futures[k] = None  # its result is the caller's now


def search_group(
    keys,
    payload,
    cells,
    group: int,
    groups: int,
    query_rows,
    threshold: float,
    bf16=None,
    forest: bool = False,
    vectorize=None,
    cell_fn=None,
) -> dict:
    """All cells of one shuffle group -> columnar results (numpy arrays of keys and similarities):
    ``edges`` (a, b, sim) with a < b, each pair once over all cells (``forest``: only a
    breadth-first spanning forest of the group's pairs, which keeps the components); ``nn`` (key,
    nn_key, sim) final for rows in one cell; ``nn_partial`` the same for rows in several cells (to
    combine). ``payload`` rows are turned into (m, H, d) vectors by ``vectorize`` one cell at a
    time (the stored float16 stays as it is; only a cell is float32 at once). ``cell_fn``: the
    in-cell search (``search_cell``'s contract; packed binary codes: transforms.hamming_search)."""
    keys = np.asarray(keys)
    rows = dedup_keys(keys, payload)
    keys, cells = keys[rows], cells[rows]
    row, col = np.nonzero((cells >= 0) & (cells % groups == group))
    flat = cells[row, col]
    order = np.lexsort((row, flat))  # by cell, members in key order
    row, flat = row[order], flat[order]
    starts = np.flatnonzero(np.r_[True, flat[1:] != flat[:-1]]) if len(flat) else np.empty(0, np.int64)
    ends = np.r_[starts[1:], len(flat)]
    ea, eb, es, wa, wb, ws = [], [], [], [], [], []
    spans = [(lo, hi) for lo, hi in zip(starts.tolist(), ends.tolist(), strict=True) if hi - lo >= 2]
    several = (cells >= 0).sum(axis=1) > 1

    def one(span):
        members = row[span[0] : span[1]]
        vecs = payload[rows[members]]
        vecs = vectorize(vecs) if vectorize else vecs
        return members, (cell_fn or search_cell)(vecs, query_rows, threshold, bf16)

    for (lo, _), (members, (i, j, sim, nn, nn_sim)) in zip(
        spans, _in_threads(one, spans, [(hi - lo) ** 2 for lo, hi in spans]), strict=True
    ):
        gi, gj = members[i], members[j]
        own = np.ones(len(gi), dtype=bool)  # a row in one cell: its pairs are this cell's to report
        shared = np.flatnonzero(several[gi] & several[gj])  # in several cells: the smallest reports it
        own[shared] = owner_cell(cells[gi[shared]], cells[gj[shared]]) == flat[lo]
        ea.append(gi[own]), eb.append(gj[own]), es.append(sim[own])
        valid = nn >= 0
        wa.append(members[valid]), wb.append(members[nn[valid]]), ws.append(nn_sim[valid])
    cat = lambda xs, t: np.concatenate(xs) if xs else np.empty(0, t)  # noqa: E731
    a, b, s, w, o = cat(ea, np.int64), cat(eb, np.int64), cat(es, np.float32), cat(wa, np.int64), cat(wb, np.int64)
    if forest:  # a spanning forest of the group's pairs: the same components
        keep = shallow_forest(len(keys), a, b)
        a, b, s = a[keep], b[keep], s[keep]
    ns = cat(ws, np.float32)
    part = several[w]
    return {
        "edges": (keys[a], keys[b], s),
        "nn": (keys[w[~part]], keys[o[~part]], ns[~part]),
        "nn_partial": (keys[w[part]], keys[o[part]], ns[part]),
    }


def best_neighbours(who: np.ndarray, other: np.ndarray, sim: np.ndarray):
    """Per key, the most similar candidate (ties: the smaller other key)."""
    order = np.lexsort((other, -sim, who))
    first = np.ones(len(order), dtype=bool)
    first[1:] = who[order][1:] != who[order][:-1]
    sel = order[first]
    return who[sel], other[sel], sim[sel]


def search_in_memory(keys, vecs: np.ndarray, query_rows=(0,), threshold: float = 0.9, **plan_args) -> dict:
    """The partitioned search run in one process (tests, benchmarks, small inputs): -> {"edges":
    (a, b, sim), "nn": (key, nn_key, sim)} as arrays. ``plan_args`` as ``make_plan``'s, plus
    ``sample_cap`` and ``bf16``."""
    keys = np.asarray(keys)
    bf16 = plan_args.pop("bf16", None)
    forest = plan_args.pop("forest", False)
    cap = plan_args.pop("sample_cap", 100_000)
    q = [r for r in query_rows if r < vecs.shape[1]] or [0]
    picked = sample_rows(keys, cap, plan_args.get("seed", 0))
    sample = np.asarray(vecs[picked][:, q], dtype=np.float32).reshape(-1, vecs.shape[2])
    plan = make_plan(len(keys), sample, **plan_args)
    cells = assign(vecs[:, q], plan)
    parts = []
    in_group = groups_of(cells, plan.groups)
    for g in range(plan.groups):
        rows = np.flatnonzero((in_group == g).any(axis=1))
        found = search_group(keys[rows], vecs[rows], cells[rows], g, plan.groups, tuple(q), threshold, bf16, forest)
        parts.append(found)
    edges = tuple(np.concatenate([p["edges"][i] for p in parts]) for i in range(3))
    nn = tuple(np.concatenate([p["nn"][i] for p in parts]) for i in range(3))
    partial = best_neighbours(*(np.concatenate([p["nn_partial"][i] for p in parts]) for i in range(3)))
    nn = tuple(np.concatenate([nn[i], partial[i]]) for i in range(3))
    order = np.argsort(nn[0], kind="stable")
    return {"edges": edges, "nn": tuple(x[order] for x in nn), "plan": plan}
