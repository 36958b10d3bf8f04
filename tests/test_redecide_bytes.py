"""``memsieve decide`` with no override rewrites a LAION-layout run's tables byte for byte, even
where the run's columns arrived in many chunks (Parquet's dictionary fallback follows them)."""

import dataclasses
import hashlib
import io
import os
import shutil
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_job
from pipeline.job import run_job
from pipeline.redecide import redecide
from transforms import read_laion
from transforms.write import dictionary_columns, write_arrow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from make_laion_embeddings import generate, write  # noqa: E402

REWRITTEN = ("manifest", "diversify", "blocklist")
LONG = "x" * 600  # 2,000 urls of ~650 bytes: past Parquet's 1 MB dictionary page limit


@dataclasses.dataclass(frozen=True)
class SmallBatches(read_laion.LaionSettings):
    batch_rows: int = 250  # the reader's info tables: 8 chunks per column in the shard's tables


def _long_urls(folder) -> None:
    meta = os.path.join(folder, "metadata", "metadata_0.parquet")
    t = pq.read_table(meta)
    urls = [f"https://example.invalid/{LONG}/{k}.jpg" for k in t.column("key").to_pylist()]
    pq.write_table(t.set_column(t.schema.get_field_index("url"), "url", pa.array(urls)), meta, row_group_size=250)


def _digests(root) -> dict[str, str]:
    out = {}
    for table in REWRITTEN:
        for name in sorted(os.listdir(os.path.join(root, table))):
            with open(os.path.join(root, table, name), "rb") as f:
                out[f"{table}/{name}"] = hashlib.sha256(f.read()).hexdigest()
    with open(os.path.join(root, "blocklist.txt"), "rb") as f:
        out["blocklist.txt"] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def laion_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("laion-bytes")
    write(str(root / "emb"), *generate(2000, 32, seed=5, topics=40, trigger_group=30), files=1)
    _long_urls(root / "emb")
    cfg = load_job(
        os.path.join(ROOT, "jobs", "laion_embeddings.yaml"),
        ["output.report=false"],
        input_path=str(root / "emb"),
        output_dir=str(root / "out"),
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(read_laion, "LaionSettings", SmallBatches)
        run_job(cfg)
    return root / "out"


def test_writer_bytes_do_not_depend_on_chunks(tmp_path):
    urls = pa.array([f"https://example.invalid/{LONG}/{i:07d}.jpg" for i in range(2000)])
    one = pa.table({"url": urls})
    many = pa.Table.from_batches(one.to_batches(max_chunksize=250))
    assert many.column("url").num_chunks == 8
    plain = []
    for table in (one, many):
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd", write_statistics=True)
        plain.append(buf.getvalue())
    assert plain[0] != plain[1]  # pyarrow's bytes follow the chunks ...
    ours = [write_arrow(str(tmp_path / name), table) for name, table in (("one", one), ("many", many))]
    single = io.BytesIO()  # the one-chunk table with the writer's settings (unique urls: no dictionary)
    pq.write_table(one, single, compression="zstd", write_statistics=True, use_dictionary=dictionary_columns(one))
    assert open(ours[0], "rb").read() == open(ours[1], "rb").read() == single.getvalue()  # ... the writer's do not


def test_laion_decide_without_override_reproduces_the_bytes(laion_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(laion_run, run)
    manifest = pq.read_table(str(run / "manifest"))
    assert manifest.num_rows == 2000 and (manifest.column("decision").to_numpy(zero_copy_only=False) == "drop").any()
    before = _digests(run)
    assert before.keys() >= {"manifest/part-metadata_0.parquet", "blocklist/part-metadata_0.parquet"}
    redecide(str(run), [])
    assert _digests(run) == before
