"""Near-duplicate search over float embeddings at LAION scale (SemDeDup, repaired).

SemDeDup clusters with k-means and compares points only inside their cell, so pairs split
across cells are lost (it finds ~87% of planted duplicates on 1M vectors). Here every vector goes
to its top-m cells (m=2 by default), cells are compared with dense matrix products in blocks,
pairs found twice are kept once, and edges above the cosine threshold become clusters by
connected components (union-find), so chains are one cluster. Each row also gets its nearest
neighbour and similarity inside its cells, so the threshold can move later without recomputing.

All functions take and return arrays; the Beam stages (``transforms/ann_edges.py``) move blocks of
thousands of vectors per element.
"""

from __future__ import annotations

import numpy as np


def choose_cells(n: int, top_m: int, requested: int = 0) -> int:
    """Cells that balance assignment cost (n*k) against in-cell cost (m^2 n^2 / k)."""
    if requested:
        return requested
    return int(max(1, min(n // 50, round(0.7 * top_m * np.sqrt(n)))))


def train_centroids(sample: np.ndarray, k: int, seed: int, niter: int = 8, bf16: bool = False) -> np.ndarray:
    """Spherical k-means (cosine) on a sample, seeded: k sample rows, then niter Lloyd steps.

    Written on torch matmuls rather than faiss.Kmeans: on this 2-core CPU faiss' k-means took
    14.6 s for 59k x 1400 x 512 where these matmuls take about 3 s. Empty cells keep their centre.
    ``bf16``: the assignment products in bf16 (a near-tie may pick the other centre; the centres
    are still means of fp32 rows).
    """
    import torch

    x = torch.from_numpy(np.ascontiguousarray(sample, dtype=np.float32))
    x = torch.nn.functional.normalize(x, dim=1)
    k = max(1, min(k, len(x)))
    gen = torch.Generator().manual_seed(seed)
    centres = x[torch.randperm(len(x), generator=gen)[:k]].clone()
    with torch.inference_mode():
        for _ in range(niter):
            c = centres.T.to(torch.bfloat16) if bf16 else centres.T
            xs = [x[s : s + 32768] for s in range(0, len(x), 32768)]
            assign = torch.cat([((b.to(torch.bfloat16) if bf16 else b) @ c).argmax(dim=1) for b in xs])
            sums = torch.zeros_like(centres).index_add_(0, assign, x)
            counts = torch.bincount(assign, minlength=k)
            filled = counts > 0
            centres[filled] = torch.nn.functional.normalize(sums[filled], dim=1)
    return centres.numpy()


def assign_cells(vectors: np.ndarray, centroids: np.ndarray, top_m: int, batch: int = 32768) -> np.ndarray:
    """(n, top_m) cell ids per vector, nearest first (inner product on unit vectors).

    torch's CPU matmul runs about twice numpy's here; it is only a faster BLAS, the result is the same.
    """
    import torch

    ct = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32)).T.contiguous()
    m = min(top_m, centroids.shape[0])
    out = np.full((len(vectors), top_m), -1, dtype=np.int32)
    with torch.inference_mode():
        for s in range(0, len(vectors), batch):
            x = torch.from_numpy(np.ascontiguousarray(vectors[s : s + batch], dtype=np.float32))
            out[s : s + batch, :m] = torch.topk(x @ ct, m, dim=1).indices.numpy()
    return out


def cell_pairs(ids: np.ndarray, vectors: np.ndarray, threshold: float, block: int = 4096):
    """Pairs above threshold among one cell's members, and each member's best match in the cell.

    -> (a, b, sim) arrays of global ids with a < b, and (who, nn_id, nn_sim) per member.
    """
    import torch

    x = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    n = len(ids)
    pa, pb, ps = [], [], []
    nn_idx = np.empty(n, dtype=np.int64)
    nn_sim = np.empty(n, dtype=np.float32)
    with torch.inference_mode():
        for s in range(0, n, block):
            sims = x[s : s + block] @ x.T
            rows = torch.arange(s, min(n, s + block))
            sims[rows - s, rows] = -2.0  # not itself
            best = sims.max(dim=1)
            nn_idx[s : s + len(rows)], nn_sim[s : s + len(rows)] = best.indices.numpy(), best.values.numpy()
            hit = (
                torch.nonzero(torch.triu(sims >= threshold, diagonal=1 + s)).numpy()
                if s == 0
                else torch.nonzero((sims >= threshold) & (rows[:, None] < torch.arange(n)[None, :])).numpy()
            )
            if len(hit):
                r, c = hit[:, 0], hit[:, 1]
                pa.append(ids[r + s])
                pb.append(ids[c])
                ps.append(sims[r, c].numpy())
    a = np.concatenate(pa) if pa else np.empty(0, np.int64)
    b = np.concatenate(pb) if pb else np.empty(0, np.int64)
    valid = nn_sim > -2.0
    return (
        np.minimum(a, b),
        np.maximum(a, b),
        np.concatenate(ps) if ps else np.empty(0, np.float32),
        ids[valid],
        ids[nn_idx[valid]],
        nn_sim[valid],
    )


def unique_pairs(a: np.ndarray, b: np.ndarray, s: np.ndarray, n: int):
    """Pairs found in several cells are kept once (the similarity is the same)."""
    code = a.astype(np.int64) * n + b
    _, first = np.unique(code, return_index=True)
    return a[first], b[first], s[first]


def best_neighbours(n: int, who: np.ndarray, nn: np.ndarray, sim: np.ndarray):
    """Reduce per-cell neighbour candidates to one per row: the most similar (ties: smaller id)."""
    best_sim = np.full(n, np.nan, dtype=np.float32)
    best_nn = np.full(n, -1, dtype=np.int64)
    order = np.lexsort((nn, -sim, who))
    first = np.ones(len(order), dtype=bool)
    first[1:] = who[order][1:] != who[order][:-1]
    chosen = order[first]
    best_sim[who[chosen]] = sim[chosen]
    best_nn[who[chosen]] = nn[chosen]
    return best_nn, best_sim


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components over the edges; label = the smallest row id of the component."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    smallest = np.full(labels.max() + 1 if n else 0, n, dtype=np.int64)
    np.minimum.at(smallest, labels, np.arange(n))
    return smallest[labels]


def exact_pairs(vectors: np.ndarray, threshold: float, block: int = 8192) -> set[tuple[int, int]]:
    """Brute force ground truth (for evaluation): every pair with cosine >= threshold."""
    x = np.asarray(vectors, dtype=np.float32)
    out: set[tuple[int, int]] = set()
    for s in range(0, len(x), block):
        sims = x[s : s + block] @ x.T
        r, c = np.nonzero(sims >= threshold)
        for i, j in zip(r + s, c, strict=True):
            if i < j:
                out.add((int(i), int(j)))
    return out


def dedup_in_memory(
    vectors: np.ndarray, threshold: float, top_m: int = 2, n_cells: int = 0, seed: int = 0, sample_size: int = 0
):
    """The whole algorithm in one process: -> (a, b, sim, nn, nn_sim, labels, centroids)."""
    n = len(vectors)
    k = choose_cells(n, top_m, n_cells)
    rng = np.random.default_rng(seed)
    sample = vectors[np.sort(rng.choice(n, size=min(n, sample_size or 40 * k), replace=False))]
    centroids = train_centroids(sample, k, seed)
    cells = assign_cells(vectors, centroids, top_m)
    a, b, s, who, nn, nns = [], [], [], [], [], []
    flat_ids = np.repeat(np.arange(n), top_m)
    flat_cells = cells.ravel()
    order = np.argsort(flat_cells, kind="stable")
    bounds = np.searchsorted(flat_cells[order], np.arange(k + 1))
    for c in range(k):
        ids = flat_ids[order[bounds[c] : bounds[c + 1]]]
        if len(ids) < 2:
            continue
        pa, pb, ps, w, m, ms = cell_pairs(ids, vectors[ids], threshold)
        a.append(pa), b.append(pb), s.append(ps), who.append(w), nn.append(m), nns.append(ms)
    cat = lambda xs, t: np.concatenate(xs) if xs else np.empty(0, t)  # noqa: E731
    ua, ub, us = unique_pairs(cat(a, np.int64), cat(b, np.int64), cat(s, np.float32), n)
    best_nn, best_sim = best_neighbours(n, cat(who, np.int64), cat(nn, np.int64), cat(nns, np.float32))
    return ua, ub, us, best_nn, best_sim, components(n, ua, ub), centroids


def cell_forest(ids: np.ndarray, vectors: np.ndarray, threshold: float, block: int = 4096):
    """Like ``cell_pairs`` but returns only a spanning forest of the cell's duplicate graph:
    (root, member) edges, at most one per member. Components are all the clustering needs, and a
    heavy-tailed group of 500 copies has 124,750 pairs but only 499 forest edges.

    -> (a, b) global-id edges, and (who, nn_id, nn_sim) per member.
    """
    import torch
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    x = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    n = len(ids)
    rs, cs = [], []
    nn_idx = np.empty(n, dtype=np.int64)
    nn_sim = np.empty(n, dtype=np.float32)
    with torch.inference_mode():
        for s in range(0, n, block):
            sims = x[s : s + block] @ x.T
            rows = torch.arange(s, min(n, s + block))
            sims[rows - s, rows] = -2.0
            best = sims.max(dim=1)
            nn_idx[s : s + len(rows)], nn_sim[s : s + len(rows)] = best.indices.numpy(), best.values.numpy()
            hit = torch.nonzero(sims >= threshold).numpy()
            if len(hit):
                rs.append(hit[:, 0] + s)
                cs.append(hit[:, 1])
    valid = nn_sim > -2.0
    neighbours = (ids[valid], ids[nn_idx[valid]], nn_sim[valid])
    if not rs:
        return np.empty(0, np.int64), np.empty(0, np.int64), *neighbours
    r, c = np.concatenate(rs), np.concatenate(cs)
    graph = coo_matrix((np.ones(len(r), dtype=np.int8), (r, c)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    root = np.full(labels.max() + 1, n, dtype=np.int64)
    np.minimum.at(root, labels, np.arange(n))
    members = np.flatnonzero(root[labels] != np.arange(n))
    return ids[root[labels[members]]], ids[members], *neighbours
