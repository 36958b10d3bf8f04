"""The LAION-layout reader alone: its DoFn in a plain loop, or ``ReadLaion`` in a Beam pipeline.

    python scripts/bench_read_laion.py DATA [--mode fn|beam] [--batch-rows 4096]

``fn``: ``ReadRangeFn`` over every planned row range in this process, no Beam (the reader's
own cost: metadata decode, validity rules, info tables, vectors). ``beam``: a DirectRunner
pipeline of ``ReadLaion`` whose outputs are only counted (adds Beam's element costs and the
cross-file repeated-key check). Prints wall and CPU seconds, the load average, peak RSS and
what came out (rows in info tables, failures, vectors, repeated-key markers).

Measured 2026-11-30 on the shared 2-core machine, 1,000,000 x 512 float16 rows in 10 files
(``out/bench/laion1000000x512`` from ``scripts/make_laion_embeddings.py``), the per-row reader
(main at 74ace18) and the columnar one back to back at load average 7-8:
``--mode fn`` 40.7 s wall / 14.4 s CPU / 1.22 GB peak RSS -> 13.1 s / 4.3 s / 0.28 GB;
``--mode beam`` 61.0 s / 21.0 s / 1.61 GB -> 11.4 s / 3.9 s / 0.45 GB. Same info tables
(meta_json byte for byte), vectors and keys on the first 200,000 rows. With norms taken a
cache-sized chunk at a time (b193fb1): ``--mode fn`` 6.8 s wall / 3.0 s CPU (load 8.4).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _size(tag: str, element) -> int:
    if tag == "infos":
        return element.num_rows
    if tag == "vectors":
        return len(element[1])
    return 1


def run_fn(data: str, batch_rows: int) -> dict:
    import apache_beam as beam

    from transforms.laion_files import list_files, plan_ranges
    from transforms.read_laion import LaionSettings, ReadRangeFn

    fn = ReadRangeFn(LaionSettings(batch_rows=batch_rows))
    fn.setup()
    counts: dict[str, int] = {}
    for item in plan_ranges(list_files(data)):
        for out in fn.process(item):
            tag, value = (out.tag, out.value) if isinstance(out, beam.pvalue.TaggedOutput) else ("infos", out)
            counts[tag] = counts.get(tag, 0) + _size(tag, value)
    return counts


def run_beam(data: str, batch_rows: int) -> dict:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from transforms.key_batches import n_buckets
    from transforms.laion_files import list_files, plan_ranges
    from transforms.read_laion import LaionSettings, ReadLaion

    files = list_files(data)
    buckets = n_buckets(len(files), sum(lf.rows for lf in files))
    counter = {}
    with beam.Pipeline(options=PipelineOptions(["--runner=DirectRunner"])) as p:
        out = p | ReadLaion(files, plan_ranges(files), LaionSettings(batch_rows=batch_rows), buckets)
        for tag in ("info_batches", "failures", "vectors", "moved"):
            name = {"info_batches": "infos"}.get(tag, tag)
            counter[tag] = beam.metrics.Metrics.counter("bench", tag)
            _ = out[tag] | f"Count{tag}" >> beam.Map(lambda e, c=counter[tag], n=name: c.inc(_size(n, e)))
    res = p.result.metrics().query()["counters"]
    return {c.key.metric.name: c.committed for c in res if c.key.metric.namespace == "bench"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data")
    parser.add_argument("--mode", choices=("fn", "beam"), default="fn")
    parser.add_argument("--batch-rows", type=int, default=4096)
    args = parser.parse_args()
    load = os.getloadavg()
    t, c = time.perf_counter(), time.process_time()
    counts = (run_fn if args.mode == "fn" else run_beam)(args.data, args.batch_rows)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    loads = f"{load[0]:.1f}->{os.getloadavg()[0]:.1f}"
    print(f"mode={args.mode} wall={wall:.1f}s cpu={cpu:.1f}s peak_rss={rss:.2f}GB load={loads}")
    print("outputs:", dict(sorted(counts.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
