"""Trigger mining's batch paths against their per-record references: Arrow terms and norms of
``ShardRecordsFn``, the bundle-summed counts of ``CountBatches``, codes batched per shard."""

import random
from collections import Counter

import pytest

from tests.test_trigger_paths import TRICKY, _batch_records, _real_captions
from transforms.keywords import KeywordExtractor, normalize_caption

ODD = ["\x1c\x1dx\x1e\x1fy\x85z\xa0w\u2028v\u3000u", "A_B__c\t\n\r\x0b\x0c", "ÀÉÎ ﬁ ① ｆｕｌｌ", " lead  trail "]
ODD += ["\x00a\x7fb"]
ODD += ["".join(chr(c) for c in range(0, 128)), "".join(chr(c) for c in range(0, 256)), "Mr. Smith's CAR-park"]


@pytest.mark.parametrize("bigrams", [False, True])
def test_batch_terms_equal_the_per_caption_term_columns(bigrams):
    """Arrow's split of ASCII captions + one lookup per distinct piece == ``terms_tuple`` per
    caption (odd whitespace and non-ASCII captions take the per-caption path)."""
    import pyarrow as pa

    from transforms.trigger_records import term_columns

    captions = TRICKY + ODD + _real_captions(1500)
    random.Random(1).shuffle(captions)
    fast, ref = KeywordExtractor(bigrams), KeywordExtractor(bigrams)
    plain = [c for c in captions if c.isascii() and not any("\x1c" <= ch <= "\x1f" for ch in c)]
    assert len(plain) < len(captions)  # Arrow's ASCII split for a batch of plain captions, else its Unicode one
    for part in [plain[:500]] + [captions[lo : lo + 700] for lo in range(0, len(captions), 700)]:
        got = fast.batch_terms(pa.chunked_array([pa.array(part[:9]), pa.array(part[9:], pa.string())]))
        want = term_columns([ref.terms_tuple(c) for c in part])
        assert got[0] == want[0]
        for g, w in zip(got[1:], want[1:], strict=True):
            assert g.dtype == w.dtype and g.tolist() == w.tolist()
    assert fast.batch_terms(pa.array([], pa.string()))[0] == ()


def test_shard_records_equal_the_per_record_fields():
    """ShardRecordsFn's columns (Arrow norms and terms, clusters by index, objects) == the
    per-record reference, a key repeated in the shard keeping its first record."""
    from schemas import arrow
    from schemas.elements import SampleInfo
    from transforms import trigger_records
    from transforms.objects import metadata_objects
    from transforms.trigger_records import ShardRecordsFn

    captions = TRICKY + ODD + _real_captions(400)
    metas = ['{"objects": ["Flag"]}', "{}", '{"\\u006fbjects": ["dome"]}', '{"x": 1}']
    infos = [SampleInfo(f"k{i:04d}", "s0", "", c, "", "", 1, 1, meta_json=metas[i % 4]) for i, c in enumerate(captions)]
    infos.append(SampleInfo("k0003", "s0", "", "a later copy", "", "", 1, 1))
    tables = [arrow.info_table(infos[:100]), arrow.info_table(infos[100:])]
    assigned = [[(f"k{i:04d}", f"c{i % 5}", 7 + i % 5) for i in range(0, len(captions), 3)]]
    fn = ShardRecordsFn(False, True)
    fn.setup()
    old_chunk = trigger_records.CHUNK
    trigger_records.CHUNK = 128
    try:
        got = [r for b in fn.process(("s0", {"info": tables, "a": assigned})) for r in b]
    finally:
        trigger_records.CHUNK = old_chunk
    lookup = {k: (c, s) for k, c, s in assigned[0]}
    ex = KeywordExtractor()
    want = [
        {
            "key": i.key,
            "shard": "s0",
            "caption": i.caption,
            "norm": normalize_caption(i.caption),
            "terms": ex.terms_tuple(i.caption),
            "objects": metadata_objects(i.meta_json),
            "cluster_id": lookup.get(i.key, (i.key, 1))[0],
            "cluster_size": lookup.get(i.key, (i.key, 1))[1],
        }
        for i in infos[:-1]
    ]
    assert got == want and any(r["objects"] for r in got)


def test_codes_by_shard_batches_records_and_passes_batches():
    from apache_beam.utils.windowed_value import WindowedValue

    from transforms.shard_columns import Batch
    from transforms.triggers import CodesByShard

    fn = CodesByShard()
    fn.start_bundle()
    ready = Batch([("k9", ("near_duplicate_caption",))])
    out = [kv for x in [(("k1", "s0"), ("a",)), ("s1", ready), (("k2", "s1"), ("b",))] for kv in fn.process(x) or ()]
    out += [w.value if isinstance(w, WindowedValue) else w for w in fn.finish_bundle()]
    assert out == [("s1", ready), ("s0", [("k1", ("a",))]), ("s1", [("k2", ("b",))])]
    assert all(isinstance(b, Batch) for _, b in out)
    fn.size = 2  # a full shard batch goes out at once
    fn.start_bundle()
    got = [fn.process((("k1", "s0"), ("a",))), fn.process((("k2", "s0"), ("b",))), fn.process((("k3", "s0"), ("c",)))]
    assert got == [(), [("s0", [("k1", ("a",)), ("k2", ("b",))])], ()]


def test_count_batches_sums_a_bundle_and_flushes():
    """CountBatches' elements, summed per key, are the batches' counts (small-cluster pairs
    only), whether or not it flushes inside the bundle."""
    from apache_beam.utils.windowed_value import WindowedValue

    from transforms.trigger_counts import batch_counts
    from transforms.trigger_records import RecordBatch
    from transforms.triggers import CountBatches

    vocabulary = frozenset(["car", "flag", "traffic light"])
    batches = [RecordBatch.from_records(_batch_records(300, seed)) for seed in (5, 6)]
    want: Counter = Counter()
    for b in batches:
        for k, c in batch_counts(b, 1, vocabulary, words=True):
            if k[0] != "p" or k[3] < 2:
                want[k] += c
    assert any(k[0] == "w" for k in want) and any(k[0] == "p" for k in want)
    for flush in (CountBatches.FLUSH, 50):
        fn = CountBatches(1, vocabulary)
        fn.FLUSH = flush
        fn.start_bundle()
        out = [kv for b in batches for kv in fn.process(b)]
        out += [w.value if isinstance(w, WindowedValue) else w for w in fn.finish_bundle()]
        got: Counter = Counter()
        for k, c in out:
            got[k] += c
        assert got == want and (len(out) > len(want)) == (flush == 50)


def test_norm_duplication_equals_cluster_duplication_to_the_bit():
    """``norm_duplication`` of normalized captions == ``captions.cluster_duplication`` of the
    captions (floats compared by repr), for clusters of every size: small ones (pairs of sets),
    large ones (one matrix product; repeated and empty captions; more than max_pairs)."""
    from transforms.captions import cluster_duplication
    from transforms.trigger_counts import norm_duplication

    rng = random.Random(3)
    words = "a cat dog on the mat red blue sky tree car x y z 1 2".split()
    real = _real_captions(300)
    for size in [0, 1, 2, 3, 4, 5, 7, 9, 20, 49, 50, 51, 120] * 6:
        captions = [
            rng.choice([" ".join(rng.choices(words, k=rng.randint(0, 7))) + rng.choice(["", "!", " A."]), *real[:3]])
            for _ in range(size)
        ]
        if size and rng.random() < 0.3:
            captions = [captions[0]] * (size - 1) + captions[-1:]
        want = cluster_duplication(captions)
        got = norm_duplication([normalize_caption(c) for c in captions])
        assert repr(got) == repr(want)
        assert repr(norm_duplication([normalize_caption(c) for c in captions], 0.8, 10)) == repr(
            cluster_duplication(captions, 0.8, 10)
        )
    for same in (["A cat!"] * 9, ["..."] * 7, ["x"] * 60 + ["y"]):  # one caption repeated; empty word sets
        assert repr(norm_duplication([normalize_caption(c) for c in same])) == repr(cluster_duplication(same))


@pytest.mark.parametrize("vocabulary", [None, frozenset(), frozenset(["car", "flag", "traffic light", "pole street"])])
def test_bundle_counts_equal_summed_batch_counts(vocabulary):
    """``BundleCounts`` over batches (an empty one, one whose norms Arrow refuses, rows with
    and without metadata objects, m = 1 and 10) == the sum of their ``batch_counts``."""
    from transforms.trigger_bundle import BundleCounts
    from transforms.trigger_counts import batch_counts
    from transforms.trigger_records import RecordBatch

    records = [_batch_records(n, seed) for n, seed in ((300, 8), (0, 1), (250, 9))]
    odd = [dict(r, norm="\ud800 " + r["norm"]) for r in _batch_records(40, 10)]
    batches = [RecordBatch.from_records(r) for r in [*records, odd]]
    for m in (1, 10):
        want: Counter = Counter()
        for b in batches:
            for k, c in batch_counts(b, m, vocabulary, words=True, pairs_below=2):
                want[k] += c
        counts = BundleCounts(m, vocabulary)
        for b in batches:
            counts.add(b)
        got = counts.items()
        assert dict(got) == dict(want) and len(got) == len(dict(got))
        assert len(counts) >= len(got)
    assert any(k[0] == "kw_mention" for k in want) == (vocabulary is not None)


def test_plain_reads_the_slice_bytes_like_the_arrow_checks():
    """``keywords._plain`` (ASCII without \\x1c-\\x1f, from the UTF-8 bytes) == Arrow's
    string_is_ascii and regex checks, on slices of string and large_string arrays."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from transforms.keywords import _plain

    texts = ["plain words", "caf\u00e9 au lait", "x\x1dy", "tab\there", "", "\x7f end", "a\x1f"]
    rng = random.Random(4)
    for kind in (pa.string(), pa.large_string()):
        for _ in range(200):
            lo = rng.randrange(len(texts))
            values = pa.array([rng.choice(texts[:1] + texts) for _ in range(6)], kind).slice(lo % 3, rng.randrange(4))
            want = pc.all(pc.string_is_ascii(values)).as_py() is not False and not (
                pc.any(pc.match_substring_regex(values, "[\\x1c-\\x1f]")).as_py()
            )
            assert _plain(values) == want


@pytest.mark.parametrize("m", [1, 10])
def test_member_columns_classify_like_the_per_member_lists(m):
    """``member_columns`` + ``classified_columns`` over a bucket's batches give what
    ``clustered_members`` + ``classified`` give: every cluster's class dict, the pair counts and
    the per-shard rows (as sets), whatever the buckets."""
    from apache_beam.pvalue import TaggedOutput

    from transforms.key_batches import split_buckets
    from transforms.trigger_clusters import classified_columns, member_columns
    from transforms.trigger_counts import clustered_members
    from transforms.trigger_records import RecordBatch
    from transforms.triggers import classified

    def split(outputs):
        out: dict = {"main": [], "pairs": [], "rows": []}
        for o in outputs:
            if isinstance(o, TaggedOutput):
                out[o.tag].extend([(o.value[0], kv) for kv in o.value[1]] if o.tag == "rows" else [o.value])
            else:
                out["main"].append(o)
        return out

    records = [_batch_records(n, seed) for n, seed in ((300, 11), (0, 2), (260, 12), (90, 13))]
    for r in records[2]:  # a cluster across batches, with two sizes (assignments that disagree)
        r["cluster_id"] = r["cluster_id"].replace("d", "c")
    batches = [RecordBatch.from_records(r) for r in records]
    for n in (1, 3):
        old: dict = {}
        for b in batches:
            for bucket, lst in split_buckets(clustered_members(b, m), n):
                old.setdefault(bucket, []).append(lst)
        new: dict = {}
        for b in batches:
            for bucket, part in member_columns(b, m, n):
                new.setdefault(bucket, []).append(part)
        want = split(o for bucket, lists in old.items() for o in classified((bucket, lists), 0.5, m))
        got = split(o for bucket, parts in new.items() for o in classified_columns((bucket, iter(parts)), 0.5, m))
        assert sorted(got["main"]) == sorted(want["main"]) and len(want["main"]) > 5
        assert repr(sorted(got["main"])) == repr(sorted(want["main"]))
        assert sorted(got["pairs"]) == sorted(want["pairs"]) and want["pairs"]
        assert sorted(got["rows"]) == sorted(want["rows"]) and {s for s, _ in want["rows"]} == {"s0", "s1"}
    assert list(member_columns(RecordBatch.from_records(records[1]), m, 3)) == []


def test_may_name_objects_reads_the_bytes_like_the_substring_kernels():
    """``may_name_objects`` (a byte search of the whole slice first) == Arrow's substring
    matches per row, on slices with nulls, empty strings and either marker."""
    import itertools

    import pyarrow as pa
    import pyarrow.compute as pc

    from transforms.trigger_records import may_name_objects

    values = ['{"x": 1}', None, '{"objects": ["a"]}', '{"\\u0041": 2}', "{}", ""]
    for combo in itertools.product(values, repeat=3):
        column = pa.array(list(combo) * 2, pa.string())
        for lo, n in itertools.product(range(6), range(7)):
            part = column.slice(lo, n)
            hit = pc.or_(pc.match_substring(part, "objects"), pc.match_substring(part, "\\u"))
            want = pc.fill_null(hit, False).to_numpy(zero_copy_only=False).tolist()
            assert may_name_objects(part).tolist() == want
            assert may_name_objects(pa.chunked_array([part], pa.string())).tolist() == want
