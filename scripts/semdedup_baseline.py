"""SemDeDup's algorithm re-implemented in-process, as the anchor: k-means with ~1,000 points per
cell, each point in exactly one cell, pairwise cosine inside cells only.

    python scripts/semdedup_baseline.py DIR [--threshold 0.9]
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transforms import ann  # noqa: E402


def semdedup(vectors: np.ndarray, threshold: float, per_cell: int = 1000, seed: int = 0):
    n = len(vectors)
    k = max(1, n // per_cell)
    rng = np.random.default_rng(seed)
    sample = vectors[np.sort(rng.choice(n, size=min(n, 40 * k), replace=False))]
    centroids = ann.train_centroids(sample, k, seed)
    cells = ann.assign_cells(vectors, centroids, 1)[:, 0]
    order = np.argsort(cells, kind="stable")
    bounds = np.searchsorted(cells[order], np.arange(k + 1))
    a, b = [], []
    for c in range(k):
        ids = order[bounds[c] : bounds[c + 1]]
        if len(ids) > 1:
            pa, pb, *_ = ann.cell_pairs(ids, vectors[ids], threshold)
            a.append(pa)
            b.append(pb)
    return (np.concatenate(a), np.concatenate(b)) if a else (np.empty(0, np.int64), np.empty(0, np.int64))


def load(root: str) -> np.ndarray:
    files = sorted(glob.glob(os.path.join(root, "img_emb", "*.npy")), key=lambda p: int(p.split("_")[-1][:-4]))
    return np.concatenate([np.load(f) for f in files])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root")
    parser.add_argument("--threshold", type=float, default=0.9)
    args = parser.parse_args()
    x = load(args.root)
    t = time.perf_counter()
    a, b = semdedup(x, args.threshold)
    print(f"SemDeDup baseline: {len(a)} pairs in {time.perf_counter() - t:.1f} s on {len(x)} rows")
    np.savez(os.path.join(args.root, "semdedup_pairs.npz"), a=a, b=b)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
