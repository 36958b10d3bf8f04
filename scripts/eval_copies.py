"""Copy-detection quality: memsieve's hashes (and ORB stage) vs. 64-bit pHash (imagehash) and PDQ.

    python scripts/make_copy_testset.py --out out/copyset
    python scripts/eval_copies.py --copyset out/copyset [--split test]
        [--shards '../shared/data/flickr8k-dev/img2dataset-256/*.tar'] [--max-hamming 13 15 17]
    python scripts/make_hard_copyset.py --out out/hardcopy
    python scripts/eval_copies.py --copyset out/hardcopy --shards '' --orb [--split test]
    memsieve run jobs/demo.yaml --input 'out/hardcopy/shards/*.tar' --output out/hardrun
    python scripts/eval_copies.py --copyset out/hardcopy --shards '' --run-dir out/hardrun

``--run-dir`` scores what a pipeline run clustered (clusters/ table: every pair in one cluster).
Hard-set negatives: ``decoy_*`` images (an unrelated photo in a copy's template) must link to
nothing but their own photo; the two ``burst`` shots of one scene must not link.

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
from transforms.phash import BITS, ROWS, compute_hashes, find_copy_pairs, hamming_threshold  # noqa: E402


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


NEGATIVE = ("original", "", "burst")


def score(found: set, source: dict, copy_pairs: dict) -> tuple[float, float, int, dict]:
    """-> precision, recall over copy pairs, number of false pairs, recall per transform."""
    true = sum(source[a] == source[b] for a, b in found)
    by = defaultdict(lambda: [0, 0])
    for pair, transform in copy_pairs.items():
        by[transform][0] += pair in found
        by[transform][1] += 1
    counted = [(h, n) for t, (h, n) in by.items() if not t.startswith("decoy")]
    recall = sum(h for h, _ in counted) / max(1, sum(n for _, n in counted))
    precision = true / len(found) if found else 1.0
    return precision, recall, len(found) - true, {t: (h / n, n) for t, (h, n) in sorted(by.items())}


def negatives(found: set, source: dict, transform: dict) -> str:
    """Decoys linked to anything but their own photo; burst pairs linked; as a short text."""
    decoys = {k for k, t in transform.items() if t.startswith("decoy")}
    bad_decoys = {k for a, b in found for k in (a, b) if k in decoys and source[a] != source[b]}
    bursts = sum(transform[a] == transform[b] == "burst" for a, b in found)
    return f"decoys linked {len(bad_decoys)}/{len(decoys)}, burst pairs linked {bursts}"


def report(label: str, found: set, source: dict, copy_pairs: dict, detail: bool, transform=None, clusters=True):
    modes = (("edges", found), ("clusters", cluster_pairs(found))) if clusters else (("clusters", found),)
    for mode, pairs in modes:
        p, r, false, by = score(pairs, source, copy_pairs)
        line = f"  {label:40s} {mode:8s} precision {p:.4f} recall {r:.4f} false pairs {false:4d}"
        if transform:
            line += "  " + negatives(pairs, source, transform)
        if detail and mode in ("edges", modes[-1][0]):
            line += "\n      " + "  ".join(f"{t} {v:.3f}" for t, (v, _) in by.items())
        print(line)


def pdq_codes(images) -> np.ndarray:
    import pdqhash

    bits = [pdqhash.compute(np.ascontiguousarray(np.asarray(im)))[0].astype(bool) for im in images]
    return np.array([np.packbits(b) for b in bits], dtype=np.uint8)


def binary_pairs(keys, codes: np.ndarray, threshold: int) -> set:
    import faiss

    index = faiss.IndexBinaryFlat(codes.shape[1] * 8)
    index.add(codes)
    lims, _, ids = index.range_search(codes, threshold + 1)
    return {(keys[i], keys[j]) for i in range(len(keys)) for j in ids[lims[i] : lims[i + 1]] if i < j}


def orb_pairs(keys, images, overrides: list[str], hash_pairs: set = frozenset()) -> set:
    """memsieve's ORB stage (pipeline.config.OrbConfig defaults, KEY=VALUE overrides) in memory;
    with only_unmatched=true the pairs whose two images both have a hash pair are not verified."""
    import yaml

    from pipeline.config import OrbConfig
    from transforms.local_features import extract_features
    from transforms.orb_stage import find_orb_pairs

    cfg = OrbConfig(**{k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in overrides)})
    feats = {k: extract_features(im, cfg) for k, im in zip(keys, images, strict=True)}
    skip = {k for p in hash_pairs for k in p} if cfg.only_unmatched else None
    return {tuple(sorted((e.key_a, e.key_b))) for e in find_orb_pairs(feats, cfg, skip)}


def run_pairs(run_dir: str) -> set:
    """Every pair of keys one pipeline run put in one cluster (its clusters/ table)."""
    from transforms.write import read_table

    groups = defaultdict(list)
    for r in read_table(os.path.join(run_dir, "clusters")).to_pylist():
        groups[r["cluster_id"]].append(r["key"])
    return {tuple(sorted(p)) for g in groups.values() for p in itertools.combinations(g, 2)}


def evaluate(name, keys, images, sources, transforms, args) -> None:
    source = dict(zip(keys, sources, strict=True))
    transform = dict(zip(keys, transforms, strict=True))
    original = {s: k for k, s, t in zip(keys, sources, transforms, strict=True) if t in ("original", "")}
    copy_pairs = {
        tuple(sorted((original[s], k))): t
        for k, s, t in zip(keys, sources, transforms, strict=True)
        if t not in NEGATIVE and s in original
    }
    print(
        f"{name}: {len(keys)} images, {len(copy_pairs)} copy pairs {dict(sorted(Counter(copy_pairs.values()).items()))}"
    )
    if args.run_dir:
        found = {p for p in run_pairs(args.run_dir) if p[0] in source and p[1] in source}
        report(f"pipeline run {args.run_dir}", found, source, copy_pairs, True, transform, False)
        return
    ih = imagehash_codes(images)
    for t in args.imagehash_thresholds:
        found = binary_pairs(keys, ih, t)
        report(f"imagehash pHash-64, hamming <= {t}", found, source, copy_pairs, args.detail, transform)
    if args.pdq_thresholds:
        pdq = pdq_codes(images)
        for t in args.pdq_thresholds:
            report(f"PDQ-256, hamming <= {t}", binary_pairs(keys, pdq, t), source, copy_pairs, args.detail, transform)
    codes = np.stack([compute_hashes(im) for im in images])
    for mh in args.max_hamming:
        label = f"memsieve phash, max_hamming {mh} ({hamming_threshold(mh)}/{BITS})"
        found = ours_pairs(keys, codes, mh)
        report(label, found, source, copy_pairs, True, transform)
        if args.orb:
            both = found | orb_pairs(keys, images, args.orb_set, found)
            report(f"memsieve phash {mh} + orb", both, source, copy_pairs, True, transform)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copyset", default="out/copyset", help="'' to skip")
    parser.add_argument("--split", default="all", choices=["all", "tune", "test"])
    parser.add_argument("--shards", default="../shared/data/flickr8k-dev/img2dataset-256/*.tar", help="'' to skip")
    parser.add_argument("--max-hamming", type=int, nargs="*", default=[PhashConfig().max_hamming])
    parser.add_argument("--imagehash-thresholds", type=int, nargs="*", default=[6, 8, 10, 12, 14])
    parser.add_argument("--pdq-thresholds", type=int, nargs="*", default=[31, 50, 70], help="none to skip PDQ")
    parser.add_argument("--orb", action="store_true", help="add memsieve's ORB stage to its hashes")
    parser.add_argument("--orb-set", nargs="*", default=[], help="ORB config overrides, e.g. min_inliers=20")
    parser.add_argument("--run-dir", default="", help="score a pipeline run's clusters/ instead")
    parser.add_argument("--detail", action="store_true", help="per-transform recall for imagehash and PDQ too")
    args = parser.parse_args(argv)
    print(f"memsieve hash: {BITS} bits x rows {ROWS}; config default max_hamming {PhashConfig().max_hamming}")
    if args.copyset:
        evaluate(f"copy set {args.copyset} ({args.split})", *load_copyset(args.copyset, args.split), args)
    if args.shards:
        evaluate("flickr8k img2dataset shards", *load_flickr(args.shards), args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
