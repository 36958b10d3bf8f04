"""Trigger mining alone over a LAION-layout folder, with the clusters of a finished run.

    python scripts/bench_triggers.py --input out/bench/laion200000x512 --run out/ref200 --out out/bt [--no-captions]

Reads the folder with the LAION reader, turns the run's ``clusters`` (and ``annotations`` for the
shards) into ClusterAssignment elements, runs ``MineTriggers`` and writes its keywords, objects
and trigger codes (sorted) to ``OUT/mined.json``, with the wall time of the pipeline; compare two
of them to check a change keeps the outputs. ``--no-captions`` leaves the caption codes out (to
time the keyword and object statistics alone).
"""

from __future__ import annotations

import argparse
import json
import os
import time


def _assignments(run_dir: str) -> list:
    import pyarrow.parquet as pq

    from schemas.elements import ClusterAssignment

    ann = pq.read_table(os.path.join(run_dir, "annotations"), columns=["key", "shard"])
    shard_of = dict(zip(ann.column("key").to_pylist(), ann.column("shard").to_pylist(), strict=True))
    rows = pq.read_table(os.path.join(run_dir, "clusters")).to_pylist()
    return [
        ClusterAssignment(
            r["key"],
            r["cluster_id"],
            r["cluster_size"],
            r["is_representative"],
            r["embedder"],
            r["similarity"],
            shard_of[r["key"]],
        )
        for r in rows
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", required=True)
    ap.add_argument("--run", required=True, help="a finished run's output folder (clusters, annotations)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--no-captions", action="store_true")
    args = ap.parse_args()

    import apache_beam as beam

    from pipeline.config import load_job
    from transforms import read_laion
    from transforms import triggers as tr

    if args.no_captions:
        tr.MineTriggers._caption_codes = lambda self, recs, counts: []
    cfg = load_job("jobs/laion_embeddings.yaml", input_path=args.input, output_dir=args.out)
    os.makedirs(args.out, exist_ok=True)
    assignments = _assignments(args.run)
    started = time.time()
    with beam.Pipeline(runner="DirectRunner") as p:
        read = read_laion.read(p, cfg, [args.input], args.out)
        mined = {
            "info_batches": read["info_batches"],
            "assignments": p | "Assignments" >> beam.Create(assignments),
        } | "MineTriggers" >> tr.MineTriggers(cfg.triggers, buckets=read["buckets"])
        gathered = [
            mined[name]
            | f"Gather_{name}" >> beam.combiners.ToList()
            | f"Tag_{name}" >> beam.Map(lambda v, n=name: (n, v))
            for name in ("keywords", "objects", "codes")
        ]
        merged = gathered | beam.Flatten() | beam.combiners.ToDict()

        def write(d):
            out = {
                "keywords": sorted(json.dumps(r, sort_keys=True) for r in d["keywords"]),
                "objects": sorted(json.dumps(r, sort_keys=True) for r in d["objects"]),
                "codes": sorted(json.dumps([[k, shard], list(c)]) for shard, b in d["codes"] for k, c in b),
            }
            with open(os.path.join(args.out, "mined.json"), "w") as f:
                json.dump(out, f)

        _ = merged | beam.Map(write)
    wall = time.time() - started
    with open(os.path.join(args.out, "mined.json")) as f:
        got = json.load(f)
    print(json.dumps({"wall_s": round(wall, 1), **{k: len(v) for k, v in got.items()}}))


if __name__ == "__main__":
    main()
