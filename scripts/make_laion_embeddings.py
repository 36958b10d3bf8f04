"""LAION-layout embeddings with planted near-duplicate groups, for the dedup benchmark.

    python scripts/make_laion_embeddings.py OUT_DIR [--rows 1000000] [--dim 512] [--files 10]

Writes ``img_emb/img_emb_N.npy`` (float16, L2-normalized) and ``metadata/metadata_N.parquet``
(key, url, caption, width, height) as LAION's precomputed releases do, plus ``truth/groups.npy``
(planted group id per row, -1 = none) outside the layout the pipeline reads. Points of one topic
sit near cosine 0.6 of each other; members of a planted group near 0.98; group sizes are
heavy-tailed (Zipf), from pairs to groups of hundreds.
"""

from __future__ import annotations

import argparse
import os

import numpy as np


def generate(rows: int, dim: int, seed: int = 0, topics: int = 2000, dup_fraction: float = 0.2):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((topics, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    # group sizes: Zipf, capped, until dup_fraction of the rows are in groups
    sizes, total = [], 0
    while total < rows * dup_fraction:
        s = int(min(rng.zipf(1.8) + 1, 500))
        sizes.append(s)
        total += s
    groups = np.full(rows, -1, dtype=np.int64)
    order = rng.permutation(rows)
    pos = 0
    for g, s in enumerate(sizes):
        groups[order[pos : pos + s]] = g
        pos += s
    topic = rng.integers(0, topics, rows)
    vectors = np.empty((rows, dim), dtype=np.float16)
    base_of_group = {}
    block = 100_000
    for start in range(0, rows, block):
        idx = np.arange(start, min(rows, start + block))
        noise = rng.standard_normal((len(idx), dim)).astype(np.float32)
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        v = 0.775 * centres[topic[idx]] + 0.632 * noise  # same-topic cosine ~0.6
        for j, row in enumerate(idx):
            g = groups[row]
            if g >= 0:
                if g not in base_of_group:
                    base_of_group[g] = v[j].copy()
                else:  # a near-duplicate: the group's base plus a little noise (cosine ~0.98)
                    v[j] = base_of_group[g] + 0.2 * rng.standard_normal(dim).astype(np.float32) / np.sqrt(dim)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        vectors[idx] = v.astype(np.float16)
    return vectors, groups


def write(out: str, vectors: np.ndarray, groups: np.ndarray, files: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for sub in ("img_emb", "metadata", "truth"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    bounds = np.linspace(0, len(vectors), files + 1).astype(int)
    rng = np.random.default_rng(1)
    for f in range(files):
        a, b = bounds[f], bounds[f + 1]
        np.save(os.path.join(out, "img_emb", f"img_emb_{f}.npy"), vectors[a:b])
        n = b - a
        keys = [f"{f:04d}{i:07d}" for i in range(n)]
        table = pa.table(
            {
                "key": keys,
                "url": [f"https://example.invalid/{k}.jpg" for k in keys],
                "caption": [f"synthetic image {k}" for k in keys],
                "width": rng.integers(200, 2000, n),
                "height": rng.integers(200, 2000, n),
            }
        )
        pq.write_table(table, os.path.join(out, "metadata", f"metadata_{f}.parquet"))
    np.save(os.path.join(out, "truth", "groups.npy"), groups)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    vectors, groups = generate(args.rows, args.dim, args.seed)
    write(args.out, vectors, groups, args.files)
    in_groups = int((groups >= 0).sum())
    print(f"{args.rows} x {args.dim} float16 -> {args.out}; {in_groups} rows in {groups.max() + 1} planted groups")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
