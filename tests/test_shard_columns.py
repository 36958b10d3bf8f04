"""The per-shard stage's columnar steps equal their row-by-row definitions: ``decide_columns`` is
``decide`` + ``manifest_row``, the blocklist tables are ``blocklist_row``, caption word counts are
``caption_words``, the vectorised partition labels are ``bucket`` (zlib.crc32)."""

import random
import zlib
from collections import Counter

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipeline.config import DecideConfig
from schemas.elements import Annotation
from transforms.decide import DECISIONS, BlocklistRows, blocklist_row, decide, manifest_row
from transforms.decide_columns import decide_codes, decide_columns, manifest_table
from transforms.diversify import caption_word_counts, caption_words
from transforms.shard_columns import annotation_rows_table
from transforms.write import bucket, bucket_labels, crc32s

CODES = ("word_trigger:cat", "implicit_object:a->b", "near_duplicate_caption", "template_caption", "object_trigger:x")


def _annotations(n: int = 400, seed: int = 3) -> list[Annotation]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        size = rng.choice([1, 1, 2, 3, 5])
        failed = rng.random() < 0.1
        out.append(
            Annotation(
                key=f"k{i:04d}",
                shard="s0",
                url=f"u{i}" if rng.random() < 0.9 else None,
                caption=rng.choice(["a cat", "", "dog on a mat"]),
                status="failed" if failed else "ok",
                failure_stage=rng.choice(["decode", "download", "probe"]) if failed else "",
                failure_type="bad" if failed else "",
                cluster_id=f"k{i - i % 3:04d}" if size > 1 else "",
                cluster_size=size,
                is_representative=size == 1 or i % 3 == 0,
                cluster_embedder=rng.choice(["", "clip", "phash"]) if size > 1 else "",
                cluster_similarity=rng.random(),
                duplication=rng.choice(["", "full", "partial"]) if size > 1 else "",
                trigger_codes=tuple(sorted(rng.sample(CODES, rng.randint(0, 3)))),
                probe_score=rng.random() if rng.random() < 0.5 else None,
                probe_flagged=rng.random() < 0.2,
            )
        )
    return out


CONFIGS = [
    DecideConfig(),
    DecideConfig(drop_failed=False, drop_duplicates=False, min_full_duplication_size=3),
    DecideConfig(min_duplicate_similarity=0.5, probe_threshold=0.6, drop_flagged_probe=False),
    DecideConfig(diversify_triggers=False, diversify_full_duplication=False, trigger_kinds=("word_trigger",)),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_decide_columns_equal_decide_row_by_row(cfg):
    rows = _annotations()
    table = annotation_rows_table(rows)
    decisions, reasons = decide_columns(table, cfg)
    got = manifest_table(table, decisions, reasons).to_pylist()
    expected = [manifest_row(a, *decide(a, cfg)) for a in rows]
    assert got == expected
    assert {r["decision"] for r in got} >= {"keep", "drop"}


@pytest.mark.parametrize("cfg", CONFIGS)
def test_decide_codes_manifest_equals_decide_row_by_row(cfg):
    """The shard stage's path: int8 decision codes, the manifest's strings made from them."""
    rows = _annotations()
    table = annotation_rows_table(rows)
    codes, reasons = decide_codes(table, cfg)
    assert codes.dtype == np.int8
    got = manifest_table(table, codes, reasons).to_pylist()
    assert got == [manifest_row(a, *decide(a, cfg)) for a in rows]
    assert [DECISIONS[c] for c in codes.tolist()] == [r["decision"] for r in got]


def test_blocklist_tables_equal_blocklist_row():
    cfg = DecideConfig(probe_threshold=0.5)
    rows = [manifest_row(a, *decide(a, cfg)) for a in _annotations(300, seed=5)]
    kept = {}
    for r in rows:
        if r["is_representative"] and r["cluster_size"] > 1 and r["decision"] != "drop":
            kept[r["cluster_id"]] = min(kept.get(r["cluster_id"], (chr(0x10FFFF),)), (r["key"], r["url"] or ""))
    expected = [blocklist_row(r, kept.get(r["cluster_id"])) for r in rows if r["decision"] == "drop"]
    assert {e["category"] for e in expected} >= {"duplicate", "memorized", "unreadable", "dead_link"}
    assert any(e["kept_key"] for e in expected) and any(
        e["category"] == "duplicate" and not e["kept_key"] for e in expected
    )
    schema = pa.schema([f for f in pa.Table.from_pylist(rows).schema])
    tables = [pa.Table.from_pylist(rows[:150], schema=schema), pa.Table.from_pylist(rows[150:], schema=schema)]

    def flat(t):
        return [tuple(r.items()) for r in t.drop_columns(["cluster_id", "shard"]).to_pylist()]

    with TestPipeline(runner="DirectRunner") as p:
        got = p | beam.Create(tables) | BlocklistRows(buckets=3) | beam.FlatMap(flat)
        assert_that(got, equal_to([tuple(e.items()) for e in expected]))


def test_caption_word_counts_equal_caption_words():
    captions = [
        "A cat on the MAT, the cat",
        "tab\tseparated  words and\nlines",
        "unicode Ünïcode straße İstanbul ÉCOLE",
        "control\x1cseparated\x1fwords here",
        "nbsp\xa0joined words",
        "",
        None,
        "x1 abc ab abcd 123 don't",
    ]
    expected = Counter(w for c in captions if c for w in caption_words(c))
    got = caption_word_counts(pa.array(captions, pa.string())).to_pylist()
    assert {r["word"]: r["count"] for r in got} == dict(expected)


def test_vectorised_buckets_equal_bucket():
    rng = random.Random(1)
    values = ["", "a", "00000000001", "héllo", "日本語キー"] + [
        "".join(rng.choice("ab7é") for _ in range(rng.randint(0, 40))) for _ in range(300)
    ]
    assert (crc32s(values) == np.array([zlib.crc32(v.encode()) for v in values], np.uint32)).all()
    for n in (1, 7, 12, 128):
        assert bucket_labels(pa.array(values), n).tolist() == [bucket(v, n) for v in values]
