"""Copy-detection quality: memsieve's multi-crop hash vs. plain 64-bit pHash (imagehash).

    python scripts/make_copy_testset.py --out out/copyset
    python scripts/eval_copies.py --copyset out/copyset [--split test]
        [--shards '../shared/data/flickr8k-dev/img2dataset-256/*.tar'] [--max-hamming 13 15 17]

Copy set (manifest.jsonl from make_copy_testset.py): a *copy pair* is (original, copy). For each
detector and threshold: recall = copy pairs found / copy pairs (overall and by transform);
precision = found pairs of one source / all found pairs (two copies of one photo count as a
true pair; two different photos as a false one). "edges" scores the pairs the detector returns;
"clusters" scores every pair put in one connected component, as the pipeline clusters them.
Flickr8k shards: the samples sharing a ``flickr_file`` (50 compressed_dup + original) are the
true pairs; acceptance 1 wants precision and recall 1.0 at the configured threshold.
"""

from __future__ import annotations

import argparse
import glob
import io
import itertools
import json
import os
import sys
import tarfile
from collections import Counter, defaultdict

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.config import PhashConfig  # noqa: E402
from transforms.phash import BITS, CROPS, compute_hashes, find_copy_pairs, hamming_threshold  # noqa: E402


def load_copyset(path: str, split: str):
    """-> keys, RGB images, source per key, transform per key."""
    rows = [json.loads(line) for line in open(os.path.join(path, "manifest.jsonl"), encoding="utf-8")]
    rows = sorted((r for r in rows if split == "all" or r["split"] == split), key=lambda r: r["file"])
    keys = [os.path.splitext(r["file"])[0] for r in rows]
    images = [Image.open(os.path.join(path, "images", r["file"])).convert("RGB") for r in rows]
    return keys, images, [r["source"] for r in rows], [r["transform"] for r in rows]


def load_flickr(pattern: str):
    """img2dataset shards -> keys, RGB images, flickr_file per key, variant per key."""
    found = []
    for shard in sorted(glob.glob(pattern)):
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar if m.isfile()}
            for name in sorted(members):
                stem, ext = os.path.splitext(name)
                if ext == ".jpg" and stem + ".json" in members:
                    meta = json.loads(tar.extractfile(members[stem + ".json"]).read())
                    img = Image.open(io.BytesIO(tar.extractfile(members[name]).read())).convert("RGB")
                    found.append((stem, img, meta["flickr_file"], meta.get("variant", "")))
    found.sort(key=lambda t: t[0])
    return [f[0] for f in found], [f[1] for f in found], [f[2] for f in found], [f[3] for f in found]


def ours_pairs(keys, codes, max_hamming: int) -> set:
    edges, _ = find_copy_pairs(keys, codes, hamming_threshold(max_hamming))
    return {(e.key_a, e.key_b) for e in edges}


def imagehash_codes(images) -> np.ndarray:
    import imagehash

    return np.array([np.packbits(imagehash.phash(im).hash.ravel()) for im in images], dtype=np.uint8)


def imagehash_pairs(keys, codes: np.ndarray, threshold: int) -> set:
    import faiss

    index = faiss.IndexBinaryFlat(64)
    index.add(codes)
    lims, _, ids = index.range_search(codes, threshold + 1)
    return {
        (keys[i], keys[j]) for i in range(len(keys)) for j in ids[lims[i] : lims[i + 1]] if i < j
    }  # keys are sorted, so i < j means keys[i] < keys[j]


def cluster_pairs(pairs: set) -> set:
    """Every pair of keys in one connected component of the found pairs."""
    parent: dict[str, str] = {}

    def root(x):
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in sorted(pairs):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups = defaultdict(list)
    for x in list(parent):
        groups[root(x)].append(x)
    return {tuple(sorted(p)) for g in groups.values() for p in itertools.combinations(g, 2)}


def score(found: set, source: dict, copy_pairs: dict) -> tuple[float, float, int, dict]:
    """-> precision, recall over copy pairs, number of false pairs, recall per transform."""
    true = sum(source[a] == source[b] for a, b in found)
    by = defaultdict(lambda: [0, 0])
    for pair, transform in copy_pairs.items():
        by[transform][0] += pair in found
        by[transform][1] += 1
    recall = sum(h for h, _ in by.values()) / max(1, len(copy_pairs))
    precision = true / len(found) if found else 1.0
    return precision, recall, len(found) - true, {t: h / n for t, (h, n) in sorted(by.items())}


def report(label: str, found: set, source: dict, copy_pairs: dict, detail: bool) -> None:
    for mode, pairs in (("edges", found), ("clusters", cluster_pairs(found))):
        p, r, false, by = score(pairs, source, copy_pairs)
        line = f"  {label:34s} {mode:8s} precision {p:.4f} recall {r:.4f} false pairs {false:4d}"
        if detail and mode == "edges":
            line += "\n      " + "  ".join(f"{t} {v:.3f}" for t, v in by.items())
        print(line)


def evaluate(name, keys, images, sources, transforms, args) -> None:
    source = dict(zip(keys, sources, strict=True))
    original = {s: k for k, s, t in zip(keys, sources, transforms, strict=True) if t in ("original", "")}
    copy_pairs = {
        tuple(sorted((original[s], k))): t
        for k, s, t in zip(keys, sources, transforms, strict=True)
        if t not in ("original", "") and s in original
    }
    print(f"{name}: {len(keys)} images, {len(copy_pairs)} copy pairs {dict(Counter(copy_pairs.values()))}")
    ih = imagehash_codes(images)
    for t in args.imagehash_thresholds:
        report(f"imagehash pHash-64, hamming <= {t}", imagehash_pairs(keys, ih, t), source, copy_pairs, args.detail)
    codes = np.stack([compute_hashes(im) for im in images])
    for mh in args.max_hamming:
        label = f"memsieve, max_hamming {mh} ({hamming_threshold(mh)}/{BITS})"
        report(label, ours_pairs(keys, codes, mh), source, copy_pairs, True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copyset", default="out/copyset", help="'' to skip")
    parser.add_argument("--split", default="all", choices=["all", "tune", "test"])
    parser.add_argument("--shards", default="../shared/data/flickr8k-dev/img2dataset-256/*.tar", help="'' to skip")
    parser.add_argument("--max-hamming", type=int, nargs="*", default=[PhashConfig().max_hamming])
    parser.add_argument("--imagehash-thresholds", type=int, nargs="*", default=[6, 8, 10, 12, 14])
    parser.add_argument("--detail", action="store_true", help="per-transform recall for imagehash too")
    args = parser.parse_args(argv)
    print(f"memsieve hash: {BITS} bits x centre crops {CROPS}; config default max_hamming {PhashConfig().max_hamming}")
    if args.copyset:
        evaluate(f"copy set {args.copyset} ({args.split})", *load_copyset(args.copyset, args.split), args)
    if args.shards:
        evaluate("flickr8k img2dataset shards", *load_flickr(args.shards), args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
