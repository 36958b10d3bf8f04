"""How many of the known Flickr original / degraded-copy pairs keep the original.

memsieve run jobs/demo.yaml --input '../shared/data/flickr8k-dev/img2dataset-256/*.tar' --output out/flickr
python scripts/eval_keeper.py out/flickr [../shared/data/flickr8k-dev]
"""

from __future__ import annotations

import glob
import json
import sys


def pairs(base: str) -> dict[str, dict[str, str]]:
    """flickr file -> {key: variant} for the pairs listed in near_duplicates.jsonl."""
    import pyarrow.parquet as pq

    with open(f"{base}/near_duplicates.jsonl", encoding="utf-8") as f:
        originals = {json.loads(line)["original"] for line in f}
    out: dict[str, dict[str, str]] = {}
    for side in glob.glob(f"{base}/img2dataset-256/*.parquet"):
        for r in pq.read_table(side).to_pylist():
            if r["status"] == "success" and r["flickr_file"] in originals:
                out.setdefault(r["flickr_file"], {})[r["key"]] = r["variant"]
    return out


def main(run_dir: str, base: str) -> int:
    from transforms.write import read_table

    decision = {r["key"]: r["decision"] for r in read_table(f"{run_dir}/manifest").to_pylist()}
    good = 0
    known = pairs(base)
    for name, members in sorted(known.items()):
        kept = [k for k in members if decision.get(k, "drop") != "drop"]
        if len(kept) == 1 and members[kept[0]] == "original":
            good += 1
        else:
            print(f"{name}: kept {[(k, members[k]) for k in kept]}")
    print(f"original kept in {good} of {len(known)} pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "../shared/data/flickr8k-dev"))
