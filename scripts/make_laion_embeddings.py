"""LAION-layout embeddings with planted near-duplicate groups and caption triggers.

    python scripts/make_laion_embeddings.py OUT_DIR [--rows 1000000] [--dim 512] [--files 10]
        [--shuffle-captions]

Writes ``img_emb/img_emb_N.npy`` (float16, L2-normalized) and ``metadata/metadata_N.parquet``
(key, url, caption, width, height, original_width, original_height, similarity) as LAION's
precomputed releases do, plus ``truth/groups.npy`` (planted group id per row, -1 = none) and
``truth/planted.json`` outside the layout the pipeline reads. Points of one topic sit near cosine
0.6 of each other; members of a planted group near 0.98; group sizes are heavy-tailed (Zipf),
from pairs to groups of hundreds; with ``trigger_group`` the first group has that many members.

Captions are 5-9 words drawn (Zipf) from a plain vocabulary. Planted word-level triggers ride on
the first group: each planted word is in most of its members' captions and in a few captions
elsewhere (a memorization trigger: the word predicts the duplicated image). With
``--shuffle-captions`` the same captions are permuted across rows: the control, where no word
is tied to any group.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

VOCABULARY = (
    "photo dog cat house tree car street beach mountain river city night sunset flower garden woman man child "
    "portrait table chair kitchen window door road bridge boat lake forest snow winter summer autumn spring "
    "red blue green yellow black white old new vintage modern wooden stone glass metal small large bright dark "
    "painting drawing poster logo shirt dress shoe bag watch ring cake bread coffee wine fruit apple orange "
    "bird horse fish sky cloud rain field farm village castle church tower wall roof floor bed sofa lamp book "
    "guitar piano music concert stage team player ball game sport race bike train plane airport station "
    "market shop store sign card map phone computer screen desk office school student teacher family friend "
    "wedding party birthday holiday travel hotel room pool park path hill valley island ocean wave sand rock"
).split()
PLANTED_WORDS = ("zorbly", "quixelate")
PLANTED_SHARE = (0.9, 0.8)  # share of the trigger group's captions carrying each word
PLANTED_ELSEWHERE = 5  # captions outside the group that carry each word too


def generate(rows: int, dim: int, seed: int = 0, topics: int = 2000, dup_fraction: float = 0.2, trigger_group: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((topics, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    # group sizes: the trigger group first, then Zipf, capped, until dup_fraction of the rows are in groups
    sizes, total = ([trigger_group], trigger_group) if trigger_group else ([], 0)
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


def captions(groups: np.ndarray, seed: int = 2, shuffle: bool = False) -> tuple[list[str], dict]:
    """One caption per row with the planted words on group 0; -> (captions, truth)."""
    rng = np.random.default_rng(seed)
    n = len(groups)
    weights = 1.0 / np.arange(1, len(VOCABULARY) + 1)
    lengths = rng.integers(5, 10, n)
    words = rng.choice(len(VOCABULARY), size=(n, 9), p=weights / weights.sum())
    caps = [" ".join(VOCABULARY[w] for w in words[i, : lengths[i]]) for i in range(n)]
    members = np.flatnonzero(groups == 0)
    outside = np.flatnonzero(groups != 0)
    planted_rows = {}
    for word, share in zip(PLANTED_WORDS, PLANTED_SHARE, strict=True):
        if not len(members):
            break
        chosen = np.concatenate(
            [
                rng.choice(members, size=int(round(share * len(members))), replace=False),
                rng.choice(outside, size=min(PLANTED_ELSEWHERE, len(outside)), replace=False),
            ]
        )
        for r in chosen:
            caps[r] = f"{caps[r]} {word}"
        planted_rows[word] = sorted(int(r) for r in chosen)
    if shuffle:
        caps = [caps[i] for i in rng.permutation(n)]
    truth = {"words": list(planted_rows), "group_rows": [int(r) for r in members], "shuffled": shuffle}
    return caps, truth


def write(
    out: str,
    vectors: np.ndarray,
    groups: np.ndarray,
    files: int,
    shuffle_captions: bool = False,
    row_group_rows: int = 65_536,
) -> list[str]:
    """Write the layout; -> every row's key in row order."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    for sub in ("img_emb", "metadata", "truth"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    bounds = np.linspace(0, len(vectors), files + 1).astype(int)
    rng = np.random.default_rng(1)
    caps, truth = captions(groups, shuffle=shuffle_captions)
    all_keys: list[str] = []
    for f in range(files):
        a, b = bounds[f], bounds[f + 1]
        np.save(os.path.join(out, "img_emb", f"img_emb_{f}.npy"), vectors[a:b])
        n = b - a
        keys = [f"{f:04d}{i:07d}" for i in range(n)]
        all_keys += keys
        width, height = rng.integers(200, 2000, n), rng.integers(200, 2000, n)
        scale = rng.choice([1, 1, 2, 3], n)
        table = pa.table(
            {
                "key": keys,
                "url": [f"https://example.invalid/{k}.jpg" for k in keys],
                "caption": caps[a:b],
                "width": width,
                "height": height,
                "original_width": width * scale,
                "original_height": height * scale,
                "similarity": rng.uniform(0.28, 0.4, n).round(4),
            }
        )
        pq.write_table(table, os.path.join(out, "metadata", f"metadata_{f}.parquet"), row_group_size=row_group_rows)
    np.save(os.path.join(out, "truth", "groups.npy"), groups)
    truth["group_keys"] = [all_keys[r] for r in truth["group_rows"]]
    with open(os.path.join(out, "truth", "planted.json"), "w", encoding="utf-8") as fh:
        json.dump(truth, fh, indent=1)
    return all_keys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trigger-group", type=int, default=40, help="members of the group the triggers ride on")
    parser.add_argument("--shuffle-captions", action="store_true", help="the control: captions permuted across rows")
    args = parser.parse_args()
    vectors, groups = generate(args.rows, args.dim, args.seed, trigger_group=args.trigger_group)
    write(args.out, vectors, groups, args.files, shuffle_captions=args.shuffle_captions)
    in_groups = int((groups >= 0).sum())
    print(f"{args.rows} x {args.dim} float16 -> {args.out}; {in_groups} rows in {groups.max() + 1} planted groups")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
