"""DaskRunner vs in-process DirectRunner on a 2,000-sample demo-style input, back to back.

    python scripts/bench_dask.py [--samples 2000] [--shards 8] [--workers 2] [--cold] [--set probe.enabled=false]

The input is the demo's samples (``pipeline/demo_data.py``: planted exact and near duplicates,
triggers, broken samples) once, then unique drawn pictures (a gradient and random shapes) with
captions of random words, up to ``--samples`` samples in ``--shards`` img2dataset shards: about 5%
of the samples are duplicates, as in a crawl. (The demo's samples repeated with edits made every
picture a member of a 20-copy cluster: that measured the copy verification, not the runner.)
Then, each as its own ``memsieve run jobs/demo.yaml`` command (report and cache off, the same
``--set`` overrides for both):

1. the in-process DirectRunner;
2. the DaskRunner against a ``dask.distributed`` LocalCluster started here before the clock
   starts, as a real cluster would be: ``pipeline.dask_runner.local_cluster()`` (2 worker
   processes, one thread each, 127.0.0.1, memsieve's imports preloaded, the batch config;
   ``--cold``: without the preload).

It prints both wall times, the ratio (issue 10's target: Dask <= 2x), the CPU seconds each
spent (the command, plus the worker processes and this process's scheduler for Dask: on a shared
machine the CPU ratio is the steadier figure), the load average and whether the two manifests are
equal (rows sorted by key, probe scores within 1e-4: torch's thread count differs per engine).

Measured 2026-11-30 on the shared 2-core machine (``nice -n 10 env PYTHONPATH=$PWD
python scripts/bench_dask.py --set probe.enabled=false``; manifests equal every time):

    before (main 74ace18)  Direct  47.8 s wall / 44.5 s CPU, Dask  72.0 s / 74.1 s: 1.51x wall, 1.66x CPU (load 4.3)
    after, run 1           Direct 135.2 s wall / 48.8 s CPU, Dask 166.4 s / 56.5 s: 1.23x wall, 1.16x CPU (load 11.4)
    after, run 2           Direct 138.3 s wall / 48.6 s CPU, Dask 169.3 s / 58.4 s: 1.22x wall, 1.20x CPU (load 9.5)
    after, run 3           Direct  70.0 s wall / 47.9 s CPU, Dask 104.6 s / 52.6 s: 1.49x wall, 1.10x CPU (load 2.6-6.4)
    after, run 4 (merged)  Direct  63.0 s wall / 45.6 s CPU, Dask  38.4 s / 48.0 s: 0.61x wall, 1.05x CPU (load 2.0-3.4)
    after, run 5 (merged)  Direct  45.9 s wall / 44.0 s CPU, Dask  48.4 s / 50.1 s: 1.05x wall, 1.14x CPU (load 3.6-3.9)
    probe on (no --set)    Direct 475.4 s wall / 167.3 s CPU, Dask 153.5 s / 88.4 s: 0.32x wall, 0.53x CPU (load 5.5)

(Dask CPU after, probe off: command 3.1-3.8 s, workers 43.7-52.3 s, scheduler 1.1-2.3 s; load: the
1-minute load average at the end of the Dask run.) See docs/engines.md, "Dask"."""

from __future__ import annotations

import argparse
import io
import os
import random
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TARGET = 2.0


WORDS = (
    "red blue green old new small large wooden glass paper metal quiet busy city river forest "
    "mountain street garden kitchen window door table chair lamp book bicycle boat train bird dog "
    "horse flower tree cloud sunset morning evening winter summer market bridge tower road field"
).split()


def _drawing(rng: random.Random) -> bytes:
    """A picture no other sample has: a gradient and a dozen random shapes, JPEG-encoded."""
    import numpy as np
    from PIL import Image, ImageDraw

    w, h = rng.randint(200, 320), rng.randint(200, 320)
    a, b = np.array([rng.randint(0, 255) for _ in range(3)]), np.array([rng.randint(0, 255) for _ in range(3)])
    t = np.linspace(0, 1, w)[None, :, None]
    img = Image.fromarray(np.broadcast_to(a * (1 - t) + b * t, (h, w, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(8, 16)):
        x0, y0 = rng.randint(0, w - 10), rng.randint(0, h - 10)
        box = (x0, y0, rng.randint(x0 + 5, w), rng.randint(y0 + 5, h))
        fill = tuple(rng.randint(0, 255) for _ in range(3))
        [draw.ellipse, draw.rectangle][rng.randint(0, 1)](box, fill=fill)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=rng.randint(75, 92))
    return buf.getvalue()


def bench_samples(n: int) -> list[dict]:
    """The demo's planted samples once, then unique drawn pictures with captions up to ``n``."""
    from pipeline.demo_data import plan_samples

    out = plan_samples(0)[:n]
    rng = random.Random(7)
    while len(out) < n:
        caption = " ".join(rng.sample(WORDS, rng.randint(3, 8)))
        out.append(
            {
                "base": "drawn",
                "variant": "unique",
                "image": _drawing(rng),
                "ext": "jpg",
                "caption": f"a drawing of {caption}",
                "objects": [],
            }
        )
    return out


def make_input(folder: str, n: int, shards: int) -> str:
    from pipeline.demo_data import write_shards

    marker = os.path.join(folder, f".made-v2-{n}-{shards}")
    if not os.path.exists(marker):
        shutil.rmtree(folder, ignore_errors=True)
        write_shards(bench_samples(n), folder, n_shards=shards, failed_downloads=0)
        open(marker, "w").close()
    return os.path.join(folder, "*.tar")


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def run_job(shards: str, out: str, sets: list[str], beam_args: list[str], log: str) -> tuple[float, float]:
    """Wall seconds and CPU seconds of one ``memsieve run`` command."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "pipeline.cli", "run", os.path.join(ROOT, "jobs", "demo.yaml")]
    cmd += ["--input", shards, "--output", out, "--set", "output.report=false", "--set", "run.cache=false"]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONHASHSEED="0")
    t, cpu = time.perf_counter(), _cpu(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([*cmd, *beam_args], capture_output=True, text=True, cwd=ROOT, env=env)
    wall, cpu = time.perf_counter() - t, _cpu(resource.RUSAGE_CHILDREN) - cpu
    with open(log, "w", encoding="utf-8") as f:
        f.write(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"run failed (exit {proc.returncode}); see {log}:\n{proc.stderr[-2000:]}")
    return wall, cpu


def _workers_cpu(address: str) -> float:
    """CPU seconds the cluster's worker processes have used since they started."""
    from distributed import Client

    with Client(address) as client:
        times = client.run(lambda: sum(__import__("psutil").Process().cpu_times()[:2]))
    return sum(times.values())


def manifest(out: str) -> list[dict]:
    from transforms.write import read_table

    return sorted(read_table(os.path.join(out, "manifest")).to_pylist(), key=lambda r: r["key"])


def same(a: list[dict], b: list[dict], tol: float = 1e-4) -> bool:
    """Equal manifests, probe scores within ``tol`` (torch's thread count differs per engine, so
    float sums round differently, ~1e-6)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        sx, sy = x["probe_score"], y["probe_score"]
        if {**x, "probe_score": None} != {**y, "probe_score": None} or (sx is None) != (sy is None):
            return False
        if sx is not None and abs(sx - sy) > tol:
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--cold", dest="warm", action="store_false", help="workers without the preload: imports in the first tasks"
    )
    parser.add_argument("--set", dest="sets", action="append", default=[], help="job overrides for both runs")
    parser.add_argument("--work", default=os.path.join(ROOT, "out", "bench-dask"))
    args = parser.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    shards = make_input(os.path.join(args.work, "shards"), args.samples, args.shards)
    direct_out, dask_out = os.path.join(args.work, "direct"), os.path.join(args.work, "dask")
    direct, direct_cpu = run_job(shards, direct_out, args.sets, ["--runner=DirectRunner"], f"{direct_out}.log")
    print(f"DirectRunner (in-process): {direct:.1f} s wall, {direct_cpu:.1f} s CPU", flush=True)
    import logging

    import distributed  # noqa: F401  (its import sets its loggers' levels)

    from pipeline.dask_runner import local_cluster

    logging.getLogger("distributed").setLevel(logging.WARNING)

    with local_cluster(args.workers, **({} if args.warm else {"preload": []})) as cluster:
        idle_workers, idle_self = _workers_cpu(cluster.scheduler_address), _cpu(resource.RUSAGE_SELF)
        beam_args = ["--runner=DaskRunner", f"--dask_client_address={cluster.scheduler_address}"]
        dask, driver_cpu = run_job(shards, dask_out, args.sets, beam_args, f"{dask_out}.log")
        workers_cpu = _workers_cpu(cluster.scheduler_address) - idle_workers
        scheduler_cpu = _cpu(resource.RUSAGE_SELF) - idle_self
    dask_cpu = driver_cpu + workers_cpu + scheduler_cpu
    print(
        f"DaskRunner ({args.workers} local workers): {dask:.1f} s wall, {dask_cpu:.1f} s CPU"
        f" (command {driver_cpu:.1f}, workers {workers_cpu:.1f}, scheduler {scheduler_cpu:.1f})",
        flush=True,
    )
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (the machine's other jobs share its cores)")
    equal = same(manifest(direct_out), manifest(dask_out))
    ratio = dask / direct
    print(
        f"samples {args.samples}; ratio Dask/Direct {ratio:.2f} (target <= {TARGET}), CPU ratio "
        f"{dask_cpu / direct_cpu:.2f}; manifests equal: {equal}"
    )
    return 0 if equal and ratio <= TARGET else 1


if __name__ == "__main__":
    raise SystemExit(main())
