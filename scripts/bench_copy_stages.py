"""Images/s on one core: a bare decode loop vs decode + the hash stage vs decode + ORB features.

    python scripts/bench_copy_stages.py [--images ../shared/data/flickr8k-dev/images] [--n 200]

Also times the ORB verification of candidate pairs (pairs/s): copies made in memory (aligned and
confirmed) and unrelated pairs (rejected by the alignment, as most candidates are).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.config import OrbConfig  # noqa: E402
from transforms.decode import decode_image  # noqa: E402
from transforms.local_features import extract_features, verify  # noqa: E402
from transforms.phash import compute_hashes  # noqa: E402


def rate(fn, blobs) -> float:
    fn(blobs[0])  # imports and first-call set-up are not counted
    start = time.process_time()  # CPU time of this process: fair on a shared machine
    for b in blobs:
        fn(b)
    return len(blobs) / (time.process_time() - start)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default="../shared/data/flickr8k-dev/images")
    ap.add_argument("--n", type=int, default=200)
    args = ap.parse_args(argv)
    import cv2

    cv2.setNumThreads(1)
    names = sorted(os.listdir(args.images))[: args.n]
    blobs = [open(os.path.join(args.images, n), "rb").read() for n in names]
    cfg = OrbConfig()

    def decode(b):
        return decode_image(b, "jpg", 64_000_000)

    d = rate(decode, blobs)
    h = rate(lambda b: compute_hashes(decode(b)), blobs)
    o = rate(lambda b: extract_features(decode(b), cfg), blobs)
    feats = [extract_features(decode(b), cfg) for b in blobs[:50]]
    crops = [extract_features(decode(b).crop((40, 30, 400, 300)), cfg) for b in blobs[:50]]
    start = time.process_time()
    for a, b in zip(feats, crops, strict=True):
        verify(a, b, cfg)
    v = len(feats) / (time.process_time() - start)
    start = time.process_time()  # unrelated pairs: most candidates, rejected by the alignment
    for a, b in zip(feats, crops[1:] + crops[:1], strict=True):
        verify(a, b, cfg)
    u = len(feats) / (time.process_time() - start)
    print(f"one core, {len(blobs)} Flickr JPEGs (~500x375):")
    print(f"  decode only            {d:7.1f} images/s")
    print(f"  decode + phash rows    {h:7.1f} images/s")
    print(f"  decode + ORB features  {o:7.1f} images/s")
    print(f"  ORB verification, copy pairs       {v:7.1f} pairs/s")
    print(f"  ORB verification, unrelated pairs  {u:7.1f} pairs/s")


if __name__ == "__main__":
    main()
