"""The columnar diversification (transforms/diversify_columns.py, transforms/mt_streams.py) gives
exactly what the per-row code (``diversify_row``, Python's ``random.Random``) gives."""

import random

import numpy as np
import pyarrow as pa
import pytest

import transforms.diversify_columns as dc
from pipeline.config import DiversifyConfig
from transforms.diversify import _with_shard, cluster_captions, diversify_row
from transforms.mt_streams import MAX_OUTPUTS, joined_streams, streams

SEEDS = [
    "\x00k:MC",  # a leading zero byte (one key word fewer), as long as the next one
    "1:k:M",
    "\0abc",
    "0:00010000001:RT",
    "0:00010000001:CWR",
    "-3:k:MC",
    "",
    "x",
    "\0leading zero byte",
    "ünïcode:ключ:RC",
    "7:" + "long key " * 300 + ":RNA",  # a key longer than the 624-word state
] + [f"{s}:{k}:RT" for s in (0, 1, 12345) for k in range(40)]


def test_streams_are_random_random_outputs():
    got = streams(SEEDS, MAX_OUTPUTS)
    assert got.shape == (MAX_OUTPUTS, len(SEEDS))
    for seed, column in zip(SEEDS, got.T, strict=True):
        rng = random.Random(seed)
        assert column.tolist() == [rng.getrandbits(32) for _ in range(MAX_OUTPUTS)], seed
    with pytest.raises(ValueError):
        streams(SEEDS, MAX_OUTPUTS + 1)


@pytest.mark.parametrize(("prefix", "suffix"), [("0:", ":MC"), ("12345:", ":RT"), ("-3:", ""), ("7:", ":RNA")])
def test_joined_streams_are_the_seed_strings_streams(prefix, suffix):
    """Seeds built as byte arrays (prefix + key + suffix) give ``random.Random(seed)``'s outputs:
    keys of several byte lengths (one batch each), multi-byte UTF-8, empty, past the state's length."""
    middles = [
        "",
        "a",
        "ключ",
        "00010000001",
        "x" * 3000,
        *(f"{i:011d}" for i in range(30)),
        *("é" * i for i in range(9)),
    ]
    got = joined_streams(prefix, pa.array(middles, pa.string()), suffix, 40)
    assert (got == streams([f"{prefix}{m}{suffix}" for m in middles], 40)).all()
    for m, column in zip(middles[:12], got.T[:12], strict=True):
        rng = random.Random(f"{prefix}{m}{suffix}")
        assert column.tolist() == [rng.getrandbits(32) for _ in range(40)]
    with_null = pa.array(["k", None], pa.string())  # None: its string, as an f-string gives it
    assert (
        joined_streams(prefix, with_null, suffix, 3) == streams([f"{prefix}k{suffix}", f"{prefix}None{suffix}"], 3)
    ).all()


def test_joined_streams_in_several_batches_on_threads(monkeypatch):
    """More seeds than one batch: the batches are seeded on helper threads, in any order, and
    land in their own columns (the same outputs as one batch in this thread)."""
    import transforms.mt_streams as ms

    middles = pa.array([f"{i:05d}" for i in range(300)] + ["ключ", "", "x" * 40] * 7, pa.string())
    want = joined_streams("3:", middles, ":RT", 24)
    monkeypatch.setattr(ms, "_BATCH", 16)
    got = joined_streams("3:", middles, ":RT", 24)
    assert (got == want).all()
    rng = random.Random("3:00299:RT")
    assert got[:, 299].tolist() == [rng.getrandbits(32) for _ in range(24)]


def test_draws_replay_randbelow():
    sizes = [1, 2, 3, 4, 7, 8, 9, 139, 1024, 5000, 10_001, (1 << 31) - 1]
    draws = dc.Draws(streams(SEEDS, 200))
    rngs = [random.Random(s) for s in SEEDS]
    for n in sizes + sizes[::-1]:
        assert draws.below(n).tolist() == [r._randbelow(n) for r in rngs]
    per = np.arange(len(SEEDS)) % 50 + 1  # one bound per generator
    assert draws.below(per).tolist() == [r._randbelow(int(n)) for r, n in zip(rngs, per, strict=True)]
    assert not draws.lost.any()
    short = dc.Draws(streams(SEEDS, 2))
    short.below(3), short.below(3), short.below(3)  # three draws from two outputs: some run out
    assert short.lost.any() and short.lost.all() == (short.pos >= 2).all()


VOCAB = ["zebra", "lamp", "ocean", "violin", "desert", "photo", "view"]
CAPTIONS = [
    "an astronaut in a white suit",
    "",
    None,
    " ",
    "x",
    "a a a",
    "zebra lamp ocean violin",
    "  padded   caption  ",
    "ünïcode café photo",
    "tab\tand\nnew line",
    "file\x1cseparator is whitespace to str.split",
    "ideographic\u3000space",
    "dog house window dog car photo dog pool",
]


def _rows(n: int, rng: random.Random, captions=CAPTIONS):
    rows = []
    for i in range(n):
        rows.append(
            {
                "key": f"{i:011d}",
                "shard": f"s{i % 3}",
                "caption": rng.choice(captions),
                "cluster_id": rng.choice([f"c{i % 7}", f"c{i % 5}", None, "lonely"]),
            }
        )
    return rows


def _pools(rows, limit: int = 20):
    pools = {}
    for r in rows:
        if r["cluster_id"] and r["cluster_id"] != "lonely":
            pools.setdefault(r["cluster_id"], []).append(r["caption"])
    pools["c0"] = pools.get("c0", []) + ["another caption of c0", " ", "an astronaut in a white suit "]
    return {cid: cluster_captions(caps, limit) for cid, caps in pools.items()}


def _expected(rows, pools, vocab, cfg, seed):
    out = [diversify_row(r, pools.get(r["cluster_id"], []), vocab or ["photo"], cfg, seed) for r in rows]
    out = [{**o, "shard": r["shard"]} for o, r in zip(out, rows, strict=True) if o is not None]
    return pa.Table.from_pylist(out, schema=_with_shard()) if out else None


def _table(rows):
    return pa.Table.from_pylist(
        rows,
        schema=pa.schema(
            [
                pa.field("key", pa.string(), nullable=False),
                pa.field("shard", pa.string(), nullable=False),
                ("caption", pa.string()),
                ("cluster_id", pa.string()),
            ]
        ),
    )


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"n_alternatives": 2},
        {"strategies": ("RC", "MC")},
        {"strategies": ("RNA", "RT", "RT", "CWR"), "n_alternatives": 3},
        {"strategies": ("MC",)},
    ],
)
@pytest.mark.parametrize("seed", [0, 7])
def test_table_equals_per_row(settings, seed):
    cfg = DiversifyConfig(**settings)
    rows = _rows(300, random.Random(seed))
    pools = _pools(rows)
    got = dc.diversify_table(_table(rows), pools, VOCAB, cfg, seed)
    want = _expected(rows, pools, VOCAB, cfg, seed)
    assert got.equals(want), (got.slice(0, 3).to_pylist(), want.slice(0, 3).to_pylist())
    assert got.num_rows > 100


def test_ascii_captions_split_by_arrow_same_rows():
    printable = [c for c in CAPTIONS if c is None or c.isascii() and "\x1c" not in c]
    rows = _rows(200, random.Random(3), printable)
    cfg, pools = DiversifyConfig(), _pools(rows)
    assert dc.diversify_table(_table(rows), pools, VOCAB, cfg, 3).equals(_expected(rows, pools, VOCAB, cfg, 3))


def test_redraws_and_short_streams_go_per_row(monkeypatch):
    # a one-word vocabulary: RC of "zebra zebra zebra zebra" equals that caption and is drawn again
    rows = _rows(120, random.Random(1), ["zebra zebra zebra zebra", " zebra zebra  zebra zebra", "zebra"])
    cfg, pools = DiversifyConfig(), _pools(rows)
    want = _expected(rows, pools, ["zebra"], cfg, 1)
    assert dc.diversify_table(_table(rows), pools, ["zebra"], cfg, 1).equals(want)
    monkeypatch.setattr(dc, "OUTPUTS_PER_DRAW", 1)  # most generators run out of precomputed outputs
    calls = []
    per_row = dc._per_row_dicts
    monkeypatch.setattr(
        dc, "_per_row_dicts", lambda rows, which, *a: calls.append(len(which)) or per_row(rows, which, *a)
    )
    assert dc.diversify_table(_table(rows), pools, ["zebra"], cfg, 1).equals(want)
    assert calls and calls[0] > 10


@pytest.mark.parametrize("vocab", [[], ["two words", "lamp"], [" lamp"]])
def test_other_vocabularies(vocab):
    """Tokens that are not one word go per row; no vocabulary is the fallback one."""
    rows = _rows(50, random.Random(2))
    cfg, pools = DiversifyConfig(), _pools(rows)
    assert not dc.usable_vocabulary(vocab)
    want = _expected(rows, pools, vocab, cfg, 2)
    if not vocab:
        want = _expected(rows, pools, ["photo", "image", "picture", "view", "scene", "detail"], cfg, 2)
    assert dc.diversify_table(_table(rows), pools, vocab, cfg, 2).equals(want)


def test_nothing_to_diversify():
    cfg = DiversifyConfig(strategies=("MC", "CWR"))
    rows = [{"key": "k", "shard": "s", "caption": " ", "cluster_id": None}]
    assert dc.diversify_table(_table(rows), {}, VOCAB, cfg, 0) is None
    assert dc.diversify_table(_table(rows).slice(0, 0), {}, VOCAB, cfg, 0) is None


def test_beam_tables_path_equals_per_row():
    """DiversifyCaptions on per-shard tables (as the pipeline's per-shard stage gives them), in
    buckets: the run's vocabulary and each row's alternatives as the per-row code gives them."""
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from transforms.diversify import DiversifyCaptions, caption_word_counts, vocabulary_from_counts

    rng = random.Random(4)
    words = [f"w{chr(97 + i % 26)}{chr(97 + i // 26)}" for i in range(300)]
    captions = [" ".join(rng.choices(words[: rng.randint(3, 300)], k=rng.randint(0, 9))) for _ in range(400)]
    rows = [dict(r, caption=rng.choice(captions)) for r in _rows(400, rng)]
    shards = [[r for r in rows if r["shard"] == s] for s in ("s0", "s1", "s2")]
    cfg = DiversifyConfig(vocabulary_size=40)
    counted = pa.concat_tables([caption_word_counts(pa.array([r["caption"] for r in s], pa.string())) for s in shards])
    totals = counted.group_by("word").aggregate([("count", "sum")])
    vocab = vocabulary_from_counts(list(zip(*totals.to_pydict().values(), strict=True)), cfg.vocabulary_size)
    assert 10 < len(vocab) <= 40
    clustered = [r for r in rows if r["cluster_id"] not in (None, "lonely") and r["caption"]]
    pools = {}
    for r in clustered:
        pools.setdefault(r["cluster_id"], []).append(r["caption"])
    pools = {c: cluster_captions(caps, cfg.max_cluster_captions) for c, caps in pools.items()}
    expected = _expected([r for r in rows if r["cluster_id"]], pools, vocab, cfg, 9)

    def flat(t):
        return [(r["key"], r["shard"], tuple(r["alternatives"]), r["strategy"]) for r in t.to_pylist()]

    with TestPipeline(runner="DirectRunner") as p:
        inputs = {
            "rows": p | "Rows" >> beam.Create([_table([r for r in s if r["cluster_id"]]) for s in shards]),
            "words": p
            | "Words" >> beam.Create([caption_word_counts(pa.array([r["caption"] for r in s])) for s in shards]),
            "captions": p
            | "Captions"
            >> beam.Create(
                [pa.Table.from_pylist([{"cluster_id": r["cluster_id"], "caption": r["caption"]} for r in clustered])]
            ),
        }
        got = inputs | DiversifyCaptions(cfg, seed=9, buckets=3)
        assert_that(got | beam.FlatMap(flat), equal_to(flat(expected)))


@pytest.mark.parametrize("limit", [1, 3, 20])
def test_cluster_pools_are_cluster_captions(limit):
    rng = random.Random(limit)
    tables, pools = [], {}
    for _ in range(3):
        part = [
            {"cluster_id": rng.choice(["a", "b", "c", "é", None]), "caption": rng.choice(CAPTIONS + ["b", "ä"])}
            for _ in range(60)
        ]
        tables.append(
            pa.Table.from_pylist(part, schema=pa.schema([("cluster_id", pa.string()), ("caption", pa.string())]))
        )
        for r in part:
            if r["cluster_id"] != "c":
                pools.setdefault(r["cluster_id"], []).append(r["caption"])
    want = {cid: cluster_captions(caps, limit) for cid, caps in pools.items()}
    got = dc.cluster_pools(tables + [tables[0].slice(0, 0)], pa.array(["a", "b", "é", None, "zz"]), limit)
    assert got == {cid: caps for cid, caps in want.items() if caps}
    assert dc.cluster_pools(tables, pa.array(["zz"], pa.string()), limit) == {}


def test_printable_ascii_is_the_regex():
    import pyarrow.compute as pc

    from transforms.diversify import printable_ascii

    captions = pa.array([c for c in CAPTIONS if c is not None] + ["del\x7f", "bell\x07", "ok ~", "é", ""] * 3)
    for arr in (captions, captions.slice(3, 11), captions.cast(pa.large_string())):
        want = pc.match_substring_regex(arr, r"^[\x20-\x7e\t\n\r\x0b\x0c]*$").to_pylist()
        assert printable_ascii(arr).tolist() == want
