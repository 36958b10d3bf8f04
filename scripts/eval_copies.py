"""Copy-detection quality: memsieve's multi-crop hash vs. plain 64-bit pHash (imagehash).

    python scripts/make_copy_testset.py --out out/copyset
    python scripts/eval_copies.py --copyset out/copyset [--shards '../shared/data/flickr8k-dev/img2dataset-256/*.tar']

Pair precision and recall over all pairs of images in the set, by transform, and on the
Flickr8k img2dataset shards (compressed_dup samples vs. their originals, same flickr_file).
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import sys
import tarfile
from collections import defaultdict

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transforms.phash import BITS, CROPS, compute_hashes, find_copy_pairs, hamming_threshold  # noqa: E402


def _pr(found: set, truth: set) -> tuple[float, float, int]:
    tp = len(found & truth)
    return (tp / len(found) if found else 1.0), (tp / len(truth) if truth else 1.0), len(found - truth)


def ours(keys, images, max_hamming):
    codes = np.stack([compute_hashes(im) for im in images])
    edges, _ = find_copy_pairs(keys, codes, hamming_threshold(max_hamming))
    return {(e.key_a, e.key_b) for e in edges}


def plain_phash(keys, images, threshold):
    import imagehash

    hashes = [imagehash.phash(im) for im in images]
    bits = np.array([h.hash.ravel() for h in hashes], dtype=np.uint8)
    found = set()
    for i in range(len(keys)):
        d = (bits[i + 1 :] != bits[i]).sum(axis=1)
        for j in np.nonzero(d <= threshold)[0]:
            a, b = keys[i], keys[i + 1 + j]
            found.add((min(a, b), max(a, b)))
    return found


def copyset(path):
    pairs = [json.loads(line) for line in open(os.path.join(path, "pairs.jsonl"))]
    keys = sorted(os.listdir(os.path.join(path, "images")))
    images = [Image.open(os.path.join(path, "images", k)).convert("RGB") for k in keys]
    truth = {tuple(sorted((p["copy"], p["original"]))): p["transform"] for p in pairs}
    return keys, images, truth


def flickr(pattern):
    keys, images, files = [], [], {}
    for shard in sorted(glob.glob(pattern)):
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar if m.isfile()}
            for name in sorted(members):
                if name.endswith(".jpg"):
                    key = name[:-4]
                    meta = json.loads(tar.extractfile(members[key + ".json"]).read())
                    keys.append(key)
                    images.append(Image.open(io.BytesIO(tar.extractfile(members[name]).read())).convert("RGB"))
                    files.setdefault(meta["flickr_file"], []).append(key)
    order = np.argsort(keys)
    keys = [keys[i] for i in order]
    images = [images[i] for i in order]
    truth = {tuple(sorted(v)): "compressed_dup" for v in files.values() if len(v) == 2}
    return keys, images, truth


def report(name, found, truth):
    precision, recall, false = _pr(found, set(truth))
    by = defaultdict(lambda: [0, 0])
    for pair, t in truth.items():
        by[t][1] += 1
        by[t][0] += pair in found
    detail = ", ".join(f"{t} {hit}/{n}" for t, (hit, n) in sorted(by.items()))
    print(f"  {name:34s} precision {precision:.4f} recall {recall:.4f} false pairs {false:3d} | {detail}")
    return precision, recall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copyset", default="out/copyset")
    parser.add_argument("--shards", default="../shared/data/flickr8k-dev/img2dataset-256/*.tar")
    parser.add_argument("--max-hamming", type=int, nargs="*", default=[10])
    args = parser.parse_args()
    print(f"memsieve hash: {BITS} bits x crops {CROPS}")
    for label, (keys, images, truth) in (("copy set", copyset(args.copyset)), ("flickr8k shards", flickr(args.shards))):
        print(f"{label}: {len(keys)} images, {len(truth)} true pairs")
        for t in (6, 8, 10, 12):
            report(f"imagehash pHash-64, hamming <= {t}", plain_phash(keys, images, t), truth)
        for mh in args.max_hamming:
            report(f"memsieve, max_hamming {mh} ({hamming_threshold(mh)}/{BITS})", ours(keys, images, mh), truth)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
