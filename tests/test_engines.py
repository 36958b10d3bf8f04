"""The demo job gives the same manifest on every engine (probe batches are cut per shard in key
order on every runner; scores are compared to 4 decimals since torch's thread count, and so float
rounding, differs between engines): the in-process DirectRunner, the
DirectRunner with 2 worker processes, the PortableRunner with Beam's embedded job service (the
path Flink, Spark and Dataflow take), and the DaskRunner (``pipeline/dask_runner.py``) against a
real dask.distributed scheduler with 2 workers on 127.0.0.1, on both input layouts."""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from transforms.write import read_table

ROOT = Path(__file__).resolve().parent.parent
DASK = "--runner=apache_beam.runners.dask.dask_runner.DaskRunner"  # mapped to pipeline.dask_runner
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _run(job: str, inputs: str, out: Path, *args: str) -> None:
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(ROOT / "jobs" / job), "--input", inputs]
    cmd += ["--output", str(out), "--set", "output.report=false", "--set", "run.cache=false", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _rows(out: Path, table: str, key) -> list[dict]:
    rows = read_table(str(out / table)).to_pylist()
    for r in rows:  # torch's thread count differs per engine: float sums round differently (~1e-6)
        for f in ("probe_score", "nn_similarity"):
            if r.get(f) is not None:
                r[f] = round(r[f], 4)
    return sorted(rows, key=key)


def _counters(out: Path) -> dict:
    """run.json's Beam counters, less timings (the progress namespace, BatchElements' msec)."""
    counters = json.loads((out / "run.json").read_text())["counters"]
    return {
        ns: {k: v for k, v in c.items() if not k.startswith("msec_")}
        for ns, c in counters.items()
        if ns != "memsieve.progress"
    }


def _manifest(demo_data, out: Path, *beam_args: str, shards: str = "*.tar") -> list[dict]:
    _run("demo.yaml", str(demo_data / "shards" / shards), out, *beam_args)
    return _rows(out, "manifest", lambda r: r["key"])


@pytest.fixture(scope="module")
def reference(demo_data, tmp_path_factory):
    return _manifest(demo_data, tmp_path_factory.mktemp("ref") / "out")


@pytest.mark.parametrize(
    "beam_args",
    [
        ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
        ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK"],
    ],
    ids=["direct-multiprocessing", "portable-embedded"],
)
def test_engines_agree(demo_data, reference, tmp_path, beam_args):
    assert _manifest(demo_data, tmp_path / "out", *beam_args) == reference


@pytest.fixture(scope="module")
def cluster():
    """A dask.distributed cluster of 2 worker processes (one thread each) on 127.0.0.1."""
    from pipeline.dask_runner import local_cluster

    with local_cluster(2) as c:
        yield c.scheduler_address


@pytest.mark.dask
def test_dask_runner_agrees_with_clip_on(demo_data, tmp_path, cluster):
    """The demo job with the CLIP stage on (a tiny random-weight open_clip architecture; batches
    of 8, so every shard ends in a partial batch that ``BatchElements`` emits from
    ``finish_bundle``): the manifest, and every decoded sample's CLIP neighbour, as in-process."""
    model = tmp_path / "tiny-clip.json"
    model.write_text(json.dumps(TINY_CLIP))
    clip = ["dedup.clip.enabled=true", f"dedup.clip.model={model}", "dedup.clip.batch_size=8"]
    clip += ["dedup.clip.allow_random_weights=true", "dedup.clip.threshold=0.999"]
    sets = [a for s in clip for a in ("--set", s)]
    ref = _manifest(demo_data, tmp_path / "ref", *sets)
    got = _manifest(demo_data, tmp_path / "dask", *sets, DASK, f"--dask_client_address={cluster}")
    assert got == ref and len(got) == 104
    by_key = lambda r: (r["key"], r["embedder"])  # noqa: E731
    clip_rows = [r for r in _rows(tmp_path / "dask", "neighbours", by_key) if r["embedder"] == "clip"]
    assert clip_rows == [r for r in _rows(tmp_path / "ref", "neighbours", by_key) if r["embedder"] == "clip"]
    assert len(clip_rows) == sum(r["status"] == "ok" for r in got)  # the last batches were not dropped
    assert _counters(tmp_path / "dask") == _counters(tmp_path / "ref")  # Beam metrics from the workers


@pytest.mark.dask
def test_dask_runner_agrees_on_the_laion_layout(tmp_path, cluster):
    """The LAION precomputed-embedding layout (2 files, planted duplicates and triggers): every
    table the webdataset job writes, the same manifest, clusters and counters as the DirectRunner."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_laion_embeddings import generate, write

    write(str(tmp_path / "emb"), *generate(1500, 64, seed=3, topics=40, trigger_group=40), files=2)
    job, folder, sets = "laion_embeddings.yaml", str(tmp_path / "emb"), ["--set", "dedup.keeper=earliest"]
    _run(job, folder, tmp_path / "ref", *sets)
    _run(job, folder, tmp_path / "dask", *sets, DASK, f"--dask_client_address={cluster}")
    for table, key in (("manifest", lambda r: r["key"]), ("clusters", lambda r: (r["cluster_id"], r["key"]))):
        ref, got = _rows(tmp_path / "ref", table, key), _rows(tmp_path / "dask", table, key)
        assert got == ref and ref, table
    assert len(_rows(tmp_path / "dask", "manifest", lambda r: r["key"])) == 1500
    assert _counters(tmp_path / "dask") == _counters(tmp_path / "ref") != {}


def _dump(items, path: str) -> None:
    Path(path).write_text(json.dumps(sorted(items)))


class _SplitThrees:
    @staticmethod
    def fn(x):
        import apache_beam as beam

        beam.metrics.Metrics.counter("test", "seen").inc()
        yield beam.pvalue.TaggedOutput("three", x) if x % 3 == 0 else x


def test_dask_tasks_shuffle_helpers():
    """Buckets by a hash every process agrees on; groups and combines per key in arrival order."""
    from apache_beam.internal import pickler
    from apache_beam.transforms.core import CombineFn

    from pipeline import dask_tasks

    assert dask_tasks.stable_hash("key") == 2324736937  # zlib.crc32(b"key"): no per-process salt
    assert dask_tasks.stable_hash(("a", 1)) == 2745452491  # crc32 of its repr
    pairs = [("a", 1), ("b", 2), ("a", 3), (("t", 1), 4)]
    items = dask_tasks.items_of
    (buckets,) = dask_tasks.bucketize(pairs, 3)
    buckets = [pickle.loads(pickle.dumps(b)) for b in buckets]  # as when fetched by another worker
    assert sorted((kv for b in buckets for kv in items(b)), key=repr) == sorted(pairs, key=repr)
    assert dict(items(dask_tasks.group(*buckets))) == {"a": [1, 3], "b": [2], ("t", 1): [4]}
    token, spec = ("run", "Sum"), pickler.dumps(CombineFn.maybe_from_callable(sum))
    (one,) = dask_tasks.combine_partial(pairs[:2], token, spec, 2)
    (two,) = dask_tasks.combine_partial(pairs[2:], token, spec, 2)
    merged = [kv for i in range(2) for kv in items(dask_tasks.combine_merge(token, spec, one[i], two[i]))]
    assert dict(merged) == {"a": 4, "b": 2, ("t", 1): 4}


@pytest.mark.dask
def test_dask_runner_primitives(tmp_path, cluster):
    """Tagged outputs, a singleton and a dict side input, GroupByKey, CombineGlobally,
    BatchElements' partial last batch (emitted from finish_bundle) and a Beam counter."""
    import apache_beam as beam
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.options.pipeline_options import PipelineOptions

    opts = PipelineOptions(["--runner=pipeline.dask_runner.DaskRunner", f"--dask_client_address={cluster}"])
    p = beam.Pipeline(options=opts)
    nums = p | beam.Create(list(range(30)))
    split = nums | beam.FlatMap(_SplitThrees.fn).with_outputs("three", main="rest")
    total = nums | "Sum" >> beam.CombineGlobally(sum)
    keyed = split.rest | beam.Map(lambda x, t: (x % 4, x * 1000 // t), t=beam.pvalue.AsSingleton(total))
    grouped = keyed | beam.GroupByKey() | beam.MapTuple(lambda k, v: (k, sorted(v)))
    sizes = split.three | beam.BatchElements(min_batch_size=4, max_batch_size=4) | beam.Map(len)
    lookup = split.three | beam.Map(lambda x, d: (x, len(d[x % 4])), d=beam.pvalue.AsDict(grouped))
    grouped | "G" >> beam.combiners.ToList() | "WG" >> beam.Map(_dump, str(tmp_path / "grouped"))
    sizes | "S" >> beam.combiners.ToList() | "WS" >> beam.Map(_dump, str(tmp_path / "sizes"))
    lookup | "L" >> beam.combiners.ToList() | "WL" >> beam.Map(_dump, str(tmp_path / "lookup"))
    result = p.run()
    result.wait_until_finish()
    rest = [x for x in range(30) if x % 3]
    expected = {k: sorted(x * 1000 // 435 for x in rest if x % 4 == k) for k in range(4)}
    assert dict(map(tuple, json.loads((tmp_path / "grouped").read_text()))) == expected
    assert sum(json.loads((tmp_path / "sizes").read_text())) == 10  # every multiple of 3, in batches
    assert json.loads((tmp_path / "lookup").read_text()) == [[x, len(expected[x % 4])] for x in range(0, 30, 3)]
    (seen,) = result.metrics().query(MetricsFilter().with_name("seen"))["counters"]
    assert seen.committed == 30


def test_dask_placement_and_blobs():
    """Partition i of every bag (and a shuffle's cut of input partition i) prefers worker slot i;
    a task result travels as one pickled frame (dask cuts a list of numpy arrays into one frame
    per array)."""
    import dask.bag as db
    import numpy as np
    from dask import delayed
    from distributed.protocol import dumps, to_serialize

    from pipeline import dask_tasks
    from pipeline.dask_runner import placement

    class _Client:
        def nthreads(self):
            return {"tcp://b:2": 1, "tcp://a:1": 2}

    bag = db.from_sequence(range(6), npartitions=6).map_partitions(dask_tasks.bucketize, 2)
    where, slots = placement(_Client(), bag), ["tcp://a:1", "tcp://a:1", "tcp://b:2"]
    assert {key[-1]: where(key) for key in bag.__dask_graph__()} == {i: [slots[i % 3]] for i in range(6)}
    assert where("finalize-x") == []  # a key the collection does not name: anywhere
    cut = delayed(list)([1], dask_key_name=("Group|bucket", 1, 4))  # bucket 1 of input partition 4
    assert placement(_Client(), db.from_delayed([cut]))(("Group|bucket", 1, 4)) == [slots[4 % 3]]
    rows = [(f"k{i}", np.arange(i, i + 40)) for i in range(300)]
    assert len(dumps({"data": to_serialize(rows)})) > 300  # what a plain list costs
    frames = dumps({"data": to_serialize(dask_tasks.Blob(rows))})
    assert len(frames) <= 3
    got = pickle.loads(pickle.dumps(dask_tasks.Blob(rows))).items
    assert [k for k, _ in got] == [k for k, _ in rows] and all(
        (a == b).all() for (_, a), (_, b) in zip(got, rows, strict=True)
    )
