"""Exact duplicate, near-duplicate and template captions in caption sets, with counts.

    python scripts/caption_report.py [FILES...]   # default: the sets in ../shared/data/captions

Reads .parquet (a caption/TEXT column) or .csv (a Caption column, ';' or ',' separated).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transforms.captions import near_duplicate_groups, template_groups  # noqa: E402
from transforms.keywords import normalize_caption  # noqa: E402


def load_captions(path: str) -> list[str]:
    import pandas as pd

    if path.endswith(".parquet"):
        df = pd.read_parquet(path)
    else:
        df = pd.read_csv(path, sep=None, engine="python")
    column = next(c for c in df.columns if c.lower() in ("caption", "text", "prompt"))
    return [str(c) for c in df[column].dropna().tolist()]


def report(path: str, top: int) -> None:
    caps = load_captions(path)
    norm = Counter(normalize_caption(c) for c in caps)
    dups = [(c, n) for c, n in norm.most_common() if n > 1]
    print(f"\n== {os.path.basename(path)}: {len(caps)} captions, {len(norm)} distinct after normalizing")
    print(f"exact duplicate captions: {len(dups)} texts covering {sum(n for _, n in dups)} captions")
    for c, n in dups[:top]:
        print(f"  {n:4d} x {c[:90]!r}")
    near = near_duplicate_groups(caps)
    print(
        f"near-duplicate caption groups (word-set Jaccard >= 0.8, not identical): {len(near)} groups, "
        f"{sum(len(g) for g in near)} captions"
    )
    for g in sorted(near, key=len, reverse=True)[:top]:
        print(f"  {len(g):4d}: " + " | ".join(repr(caps[i][:50]) for i in g[:3]))
    templates = template_groups(caps, min_df=max(20, len(caps) // 500))
    print(f"template captions: {len(templates)} skeletons covering {sum(len(v) for v in templates.values())} captions")
    for sk, idx in sorted(templates.items(), key=lambda kv: -len(kv[1]))[:top]:
        print(f"  {len(idx):4d} x {sk[:70]!r}  e.g. {caps[idx[0]][:60]!r}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*")
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    files = args.files or sorted(glob.glob("../shared/data/captions/*"))
    for path in files:
        report(path, args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
