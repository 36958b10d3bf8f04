"""The partitioned cell search (``transforms.cell_search``, what VectorEdges runs per cell group)
against the in-process SemDeDup baseline on the same planted LAION-layout rows, back to back.

    python scripts/bench_cells.py [--rows 1000000] [--dim 512] [--check-subset 40000] [--margin 0.05]

Prints both wall times and their ratio; edge recall / precision against brute-force exact pairs
among a random subset of rows; and pairwise precision / recall of the clusters (connected
components of the edges) against the planted groups over all rows. Data is generated once under
out/bench/ (scripts/make_laion_embeddings.py). Not part of `make test`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from scripts.semdedup_baseline import load, semdedup  # noqa: E402
from transforms import ann, cell_search  # noqa: E402


def cluster_pr(labels: np.ndarray, groups: np.ndarray) -> tuple[float, float]:
    """Pairwise precision / recall of clusters (labels) against planted groups (-1 = none)."""
    pairs = lambda c: int((c * (c - 1) // 2).sum())  # noqa: E731
    _, found = np.unique(labels, return_counts=True)
    truth = np.where(groups >= 0, groups, -1 - np.arange(len(groups)))  # unplanted rows: singletons
    _, true_counts = np.unique(truth, return_counts=True)
    _, both = np.unique(truth.astype(np.int64) * (labels.max() + 1) + labels, return_counts=True)
    tp = pairs(both)
    return tp / max(1, pairs(found)), tp / max(1, pairs(true_counts))


def edge_pr(a: np.ndarray, b: np.ndarray, x: np.ndarray, rows: np.ndarray, threshold: float):
    truth = {(int(rows[i]), int(rows[j])) for i, j in ann.exact_pairs(x[rows], threshold)}
    inside = np.isin(a, rows) & np.isin(b, rows)
    found = set(zip(a[inside].tolist(), b[inside].tolist(), strict=True))
    tp = len(found & truth)
    return tp / max(1, len(truth)), tp / max(1, len(found)), len(truth)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--margin", type=float, default=0.05)
    parser.add_argument("--check-subset", type=int, default=40_000)
    parser.add_argument("--cells", type=int, default=0, help="cells (0: the default choice)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for both runs (0: torch's default)")
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    data = os.path.join(ROOT, "out", "bench", f"laion{args.rows}x{args.dim}")
    if not os.path.isdir(os.path.join(data, "img_emb")):
        make = os.path.join(ROOT, "scripts", "make_laion_embeddings.py")
        files = str(max(1, args.rows // 100_000))
        subprocess.run([sys.executable, make, data, "--rows", str(args.rows), "--dim", str(args.dim), "--files", files])
    x = load(data)
    groups = np.load(os.path.join(data, "truth", "groups.npy"))
    ids = np.arange(len(x))
    print(f"{len(x)} x {x.shape[1]} {x.dtype}; bf16 native: {cell_search.bf16_native()}", flush=True)

    t = time.perf_counter()
    found = cell_search.search_in_memory(
        ids, x[:, None, :], (0,), args.threshold, margin=args.margin, requested_cells=args.cells
    )
    a, b, _ = found["edges"]
    labels = ann.components(len(x), a, b)
    ours = time.perf_counter() - t
    plan = found["plan"]
    print(f"cell search: {ours:.1f} s, {plan.cells} cells in {plan.groups} groups, {len(a)} edges", flush=True)

    if not args.skip_baseline:
        t = time.perf_counter()
        sa, sb = semdedup(x, args.threshold)
        base_labels = ann.components(len(x), sa, sb)
        base = time.perf_counter() - t
        print(f"SemDeDup baseline: {base:.1f} s, {len(sa)} pairs; ratio cell search / baseline {ours / base:.2f}")

    rows = np.sort(np.random.default_rng(0).choice(len(x), size=min(len(x), args.check_subset), replace=False))
    r, p, n_truth = edge_pr(a, b, x, rows, args.threshold)
    print(f"edges vs exact pairs among {len(rows)} random rows ({n_truth} pairs): recall {r:.4f} precision {p:.4f}")
    cp, cr = cluster_pr(labels, groups)
    print(f"clusters vs planted groups, pairwise: precision {cp:.4f} recall {cr:.4f}")
    if not args.skip_baseline:
        r2, p2, _ = edge_pr(sa, sb, x, rows, args.threshold)
        bp, br = cluster_pr(base_labels, groups)
        print(f"baseline: edge recall {r2:.4f} precision {p2:.4f}; clusters precision {bp:.4f} recall {br:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
