"""Benchmark: the pipeline's CLIP stage (Beam, DirectRunner) vs. a bare open_clip loop, one run.

    HF_HUB_OFFLINE=1 python scripts/bench_clip.py [--images 256] [--batch-size 32] [--model ViT-B-32]
        [--precision auto] [--repeats 2] [--shards '../shared/data/flickr8k-dev/img2dataset-256/*.tar']

Both sides embed the same Flickr8k shard images with the same architecture (random weights:
the cost is the architecture's), batch size, dtype and decoding (PIL, the model's own
preprocessing), read from one temporary tar of the first ``--images`` samples. The stage runs
as ``EmbedClip`` in a Beam pipeline on the in-process DirectRunner with one worker (the tar is
read by a FlatMap, as a reader stage would); the loop runs in this process. Each timing covers
reading the tar, model load and all images; the sides alternate ``--repeats`` times and the best of each is compared
(the machine is shared, so single timings are noisy).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import os
import shutil
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def write_bench_shard(pattern: str, limit: int, path: str) -> int:
    """The first ``limit`` jpg samples of the shards, copied into one tar both sides read."""
    n = 0
    with tarfile.open(path, "w") as out:
        for shard in sorted(glob.glob(pattern)):
            with tarfile.open(shard) as tar:
                for member in sorted((m for m in tar if m.isfile() and m.name.endswith(".jpg")), key=lambda m: m.name):
                    data = tar.extractfile(member).read()
                    member.name = f"{os.path.basename(shard)[:-4]}_{member.name}"
                    out.addfile(member, io.BytesIO(data))
                    n += 1
                    if n == limit:
                        return n
    return n


def read_samples(path: str) -> list:
    """A tar of jpg members -> the pipeline's Sample elements."""
    from schemas.elements import Sample

    shard = os.path.basename(path)[:-4]
    with tarfile.open(path) as tar:
        return [
            Sample(m.name[:-4], shard, "", "", "{}", data, "jpg", hashlib.sha256(data).hexdigest())
            for m in tar
            if m.isfile()
            for data in [tar.extractfile(m).read()]
        ]


def bare_loop(path: str, cfg) -> int:
    """What a person would write: load the model, then decode, preprocess and embed in batches."""
    import torch
    from PIL import Image

    from transforms.embed_clip import load_clip

    bundle = load_clip(cfg.model, cfg.pretrained, cfg.device, cfg.precision)
    samples = read_samples(path)
    n = 0
    for start in range(0, len(samples), cfg.batch_size):
        batch = samples[start : start + cfg.batch_size]
        images = [bundle.preprocess(Image.open(io.BytesIO(s.image)).convert("RGB")) for s in batch]
        with torch.inference_mode():
            features = bundle.model.encode_image(torch.stack(images).to(bundle.device, bundle.dtype))
            features = torch.nn.functional.normalize(features.float(), dim=-1).numpy()
        n += len(features)
    return n


def pipeline_stage(path: str, cfg) -> int:
    import apache_beam as beam
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.options.pipeline_options import PipelineOptions

    from transforms.embed_clip import EmbedClip

    options = PipelineOptions(runner="DirectRunner", direct_num_workers=1, direct_running_mode="in_memory")
    p = beam.Pipeline(options=options)
    samples = p | beam.Create([path]) | "Read" >> beam.FlatMap(read_samples)
    out = samples | EmbedClip(cfg)
    _ = out["embeddings"] | beam.Map(lambda kv: len(kv[0]))
    result = p.run()
    result.wait_until_finish()
    counters = result.metrics().query(MetricsFilter().with_name("embedded"))["counters"]
    return sum(c.committed or c.attempted for c in counters)


def timed(fn, *args) -> tuple[float, int]:
    start = time.perf_counter()
    n = fn(*args)
    return time.perf_counter() - start, n


def main(argv: list[str] | None = None) -> int:
    import apache_beam  # noqa: F401 - imports are paid before any timing, for both sides
    import open_clip  # noqa: F401
    import torch

    from pipeline.config import ClipConfig
    from transforms.embed_clip import resolve_device_dtype

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default="../shared/data/flickr8k-dev/img2dataset-256/*.tar")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    cfg = ClipConfig(
        enabled=True, model=args.model, batch_size=args.batch_size, precision=args.precision, device=args.device
    )
    tmp = tempfile.mkdtemp(prefix="bench-clip-")
    path = os.path.join(tmp, "bench.tar")
    n_images = write_bench_shard(args.shards, args.images, path)
    device, dtype = resolve_device_dtype(cfg.device, cfg.precision)
    print(
        f"{n_images} images, {cfg.model} random weights, batch {cfg.batch_size}, {device} {dtype}, "
        f"torch threads {torch.get_num_threads()}"
    )
    best = {"bare loop": float("inf"), "pipeline": float("inf")}
    for r in range(args.repeats):
        for name, fn in (("bare loop", bare_loop), ("pipeline", pipeline_stage)):
            seconds, n = timed(fn, path, cfg)
            assert n == n_images, f"{name} embedded {n} of {n_images}"
            best[name] = min(best[name], seconds)
            print(f"  run {r + 1} {name:9s} {seconds:7.2f} s  {n / seconds:7.2f} samples/s")
    shutil.rmtree(tmp)
    ratio = best["bare loop"] / best["pipeline"]
    print(
        f"best: bare loop {n_images / best['bare loop']:.2f} samples/s, "
        f"pipeline {n_images / best['pipeline']:.2f} samples/s, pipeline/bare = {ratio:.1%} (target >= 85%)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
