"""LAION-scale dedup benchmark: the whole `memsieve run jobs/laion_embeddings.yaml` command timed,
its peak RSS, and pair recall / precision against exact pairs at the same cosine threshold;
SemDeDup's algorithm on the same data as the anchor.

    python scripts/bench_laion.py [--rows 1000000] [--check-subset 60000]

Exact pairs over all 1M^2 pairs would take an hour here, so the exact check is brute force over
a random subset of rows (every pair among them), plus the planted groups over all rows.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from scripts.semdedup_baseline import load, semdedup  # noqa: E402
from transforms import ann  # noqa: E402
from transforms.write import read_table  # noqa: E402


def pr(found: set, truth: set) -> tuple[float, float]:
    tp = len(found & truth)
    return (tp / len(truth) if truth else 1.0), (tp / len(found) if found else 1.0)


def subset_truth(x: np.ndarray, rows: np.ndarray, threshold: float) -> set:
    pairs = ann.exact_pairs(x[rows], threshold)
    return {(int(rows[i]), int(rows[j])) for i, j in pairs}


def cluster_pairs(cluster: np.ndarray, rows: np.ndarray):
    """Pairs (i < j) among ``rows`` that share a cluster id."""
    ids = cluster[rows]
    order = np.argsort(ids, kind="stable")
    a, b = [], []
    start = 0
    for end in list(np.flatnonzero(ids[order][1:] != ids[order][:-1]) + 1) + [len(order)]:
        members = np.sort(rows[order[start:end]])
        if len(members) > 1:
            i, j = np.triu_indices(len(members), 1)
            a.append(members[i])
            b.append(members[j])
        start = end
    return (np.concatenate(a), np.concatenate(b)) if a else (np.empty(0, int), np.empty(0, int))


def restrict(a: np.ndarray, b: np.ndarray, rows: np.ndarray) -> set:
    inside = np.isin(a, rows) & np.isin(b, rows)
    return set(zip(a[inside].tolist(), b[inside].tolist(), strict=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--check-subset", type=int, default=60_000)
    args = parser.parse_args()
    data = os.path.join(ROOT, "out", "bench", f"laion{args.rows}")
    if not os.path.isdir(os.path.join(data, "img_emb")):
        subprocess.run(
            [
                sys.executable,
                os.path.join(ROOT, "scripts", "make_laion_embeddings.py"),
                data,
                "--rows",
                str(args.rows),
                "--files",
                str(max(1, args.rows // 100_000)),
            ],
            check=True,
        )
    out = os.path.join(ROOT, "out", "bench", f"laion{args.rows}-run")
    cmd = [
        "/usr/bin/time",
        "-v",
        os.path.join(ROOT, ".venv", "bin", "memsieve"),
        "run",
        os.path.join(ROOT, "jobs", "laion_embeddings.yaml"),
        "--input",
        data,
        "--output",
        out,
        "--set",
        f"dedup.cluster.threshold={args.threshold}",
    ]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        print(proc.stderr[-3000:])
        return 1
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 1024**2
    x = load(data)
    rows = np.sort(np.random.default_rng(0).choice(len(x), size=min(len(x), args.check_subset), replace=False))
    truth = subset_truth(x, rows, args.threshold)
    manifest = read_table(os.path.join(out, "manifest"))
    cluster = np.asarray(manifest.column("cluster_id").to_pylist(), dtype=object)  # rows in key order
    a, b = cluster_pairs(cluster, rows)
    r, p = pr(set(zip(a.tolist(), b.tolist(), strict=True)), truth)
    print(f"memsieve: {args.rows} rows, wall {wall:.1f} s (whole command), peak RSS {rss:.2f} GB")
    print(
        f"  vs exact pairs at cosine >= {args.threshold} among {len(rows)} random rows ({len(truth)} pairs): "
        f"recall {r:.4f} precision {p:.4f}"
    )
    print(f"  manifest rows {manifest.num_rows}, distinct keys {len(set(manifest.column('key').to_pylist()))}")
    t = time.perf_counter()
    sa, sb = semdedup(x, args.threshold)
    s_time = time.perf_counter() - t
    r2, p2 = pr(restrict(sa, sb, rows), truth)
    groups = np.load(os.path.join(data, "truth", "groups.npy"))
    sizes = np.bincount(groups[groups >= 0])
    planted = int((sizes * (sizes - 1) // 2).sum())
    same = groups[sa] == groups[sb]
    print(
        f"SemDeDup algorithm (in-process, 1 cell per point, ~1000 per cell): {s_time:.1f} s, {len(sa)} pairs; "
        f"subset recall {r2:.4f} precision {p2:.4f}; planted pairs found {int((same & (groups[sa] >= 0)).sum())}"
        f" of {planted} ({(same & (groups[sa] >= 0)).sum() / planted:.4f})"
    )
    labels = np.unique(cluster, return_inverse=True)[1]
    inside = groups >= 0
    _, counts = np.unique(groups[inside].astype(np.int64) * (labels.max() + 1) + labels[inside], return_counts=True)
    ours = int((counts * (counts - 1) // 2).sum())
    print(f"memsieve planted pairs in one cluster: {ours} of {planted} ({ours / planted:.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
