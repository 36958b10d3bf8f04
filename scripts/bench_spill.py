"""Spill versus re-reading LAION's .npy ranges (docs/engines.md, "Vectors out of Beam's data plane").

    PYTHONPATH=$PWD python scripts/bench_spill.py out/bench/laion1000000x512 [rows_per_file]

Writes every 4,096-row batch of the folder's img_emb/*.npy once through ``transforms.spill``
(under $TMPDIR, removed), reads it back, and re-reads the same .npy ranges; prints CPU seconds.
"""

import glob
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from transforms import row_blobs, spill
from transforms.laion_files import NpyRows

BATCH = 4096


def main(root: str, rows: int = 100_000) -> None:
    files = sorted(glob.glob(os.path.join(root, "img_emb", "*.npy")))
    ranges = [(f, s, min(s + BATCH, rows)) for f in files for s in range(0, rows, BATCH)]
    folder = tempfile.mkdtemp(prefix="bench-spill-")
    try:
        batches = [(np.array([f"{s + i:09d}" for i in range(e - s)]), NpyRows(f).rows(s, e)) for f, s, e in ranges]
        t = time.process_time()
        refs = [spill.write(folder, k, v.reshape(len(v), 1, -1)) for k, v in batches]
        print(f"spill write: {time.process_time() - t:.2f} CPU-s, {sum(r.nbytes for r in refs) / 1e9:.2f} GB")
        t = time.process_time()
        for r in refs:
            row_blobs.rows_of(r)
        print(f"spill read: {time.process_time() - t:.2f} CPU-s")
        t = time.process_time()
        for f, s, e in ranges:
            NpyRows(f).rows(s, e)
        print(f".npy range read: {time.process_time() - t:.2f} CPU-s ({len(ranges)} batches)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))
