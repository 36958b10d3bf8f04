"""Trigger mining's fast paths equal their per-caption references: piece-cached lemmas vs spaCy on
the whole caption, distinct-caption MinHash bands vs one band entry per record, batch counters vs
per-record events."""

import glob
import json
import os
import random
from collections import Counter

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from transforms.captions import minhash_bands
from transforms.keywords import KeywordExtractor, normalize_caption
from transforms.shard_columns import Batch
from transforms.trigger_captions import (
    MAX_BAND,
    MEMBERS,
    NEAR,
    CaptionCodes,
    caption_codes,
    group_codes,
    near_norms,
)

TRICKY = [
    "",
    "   ",
    "Don't stop: it's 3 a.m. in N.Y.C., isn't it?!",
    "dont cannot gonna wanna lemme gimme",
    "(:) :-) <3 ^_^ =) ...hello...world!!",
    "e-mail me at foo@example.com or https://example.com/a-b?c=d",
    "tabs\tand\nnewlines\u00a0and  double  spaces\u2003em",
    "Cafés, naïve résumés; über-cool STRASSE ß",
    "running runners ran; the mice's feet -- 1990s '90s 10km 5x",
    "emoji 🐶🐱 dog's cats' “quoted” ‘single’ «fr» (parens) [brackets] {braces}",
    "U.S.A. vs. U.K. etc. e.g. i.e. Mr. Smith's Dr. Who",
    "hyphen-ated well-known state-of-the-art x-ray",
    "RED Flags waving; red flags waving, Red flags!",
]


def _real_captions(limit: int = 3000) -> list[str]:
    import pyarrow.parquet as pq

    root = "/work/shared/data/captions"
    out: list[str] = []
    for path in sorted(glob.glob(os.path.join(root, "*.parquet"))):
        table = pq.read_table(path)
        col = "caption" if "caption" in table.schema.names else table.schema.names[1]
        out += [c for c in table.column(col).to_pylist() if isinstance(c, str)][:limit]
    return out


@pytest.mark.parametrize("bigrams", [False, True])
def test_piece_cached_terms_equal_spacy_on_the_whole_caption(bigrams):
    rng = random.Random(0)
    pieces = [w for c in TRICKY for w in c.split()]
    mixed = [" ".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))) for _ in range(300)]
    captions = TRICKY + mixed + _real_captions()
    reference = KeywordExtractor(bigrams)
    cached = KeywordExtractor(bigrams)
    for _ in range(2):  # the second pass reads every piece and caption from the caches
        for c in captions:
            want = reference._terms_of(reference.lemmas_spacy(c))
            assert cached.terms_tuple(c) == want, c
            assert cached.terms(c) == list(want)
    assert cached._pieces and cached._terms


def _records(n: int, seed: int) -> list[dict]:
    """Records with exact repeats, near variants, clusters, one key in two shards and a flood of
    one caption (a band of more than MAX_BAND records)."""
    rng = random.Random(seed)
    words = "red car old mosque near the river at night blue sky photo dog".split()
    bases = [rng.sample(words, rng.randint(3, 7)) for _ in range(12)]
    out = []
    for i in range(n):
        base = list(rng.choice(bases))
        if rng.random() < 0.4:
            base.append(rng.choice(words + ["sunset", "boat"]))
        caption = " ".join(base) + rng.choice(["", "!", " .", ""])
        out.append((f"k{i:05d}", f"s{i % 3}", caption, f"c{rng.randint(0, 30)}"))
    out += [(f"f{i:04d}", "s1", "flood caption for sale", f"c{i % 7}") for i in range(MAX_BAND + 5)]
    out += [("f0000", "s2", "flood caption for sale today", "c1")]
    recs = [
        {"key": k, "shard": s, "caption": c, "norm": normalize_caption(c), "cluster_id": cid} for k, s, c, cid in out
    ]
    rng.shuffle(recs)
    return recs


def _reference_codes(recs: list[dict]) -> list[tuple]:
    """One exact group per caption and one band entry per record (the per-record path)."""
    from transforms.triggers import _near_dup_keys

    exact: dict = {}
    bands: dict = {}
    for r in recs:
        exact.setdefault(r["norm"], []).append(((r["key"], r["shard"]), r["cluster_id"]))
        for b in minhash_bands(r["caption"]):
            bands.setdefault(b, []).append(((r["key"], r["shard"]), r["norm"]))
    out = [kv for members in exact.values() for kv in group_codes(members, "duplicate_caption")]
    out += sorted(set(kv for item in bands.items() for kv in _near_dup_keys(item)))
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_caption_codes_by_distinct_caption_equal_the_per_record_path(seed):
    recs = _records(600, seed)
    want = _reference_codes(recs)
    assert {c for _, (c,) in want} == {"duplicate_caption", "near_duplicate_caption"}
    batches = [recs[i : i + 97] for i in range(0, len(recs), 97)]
    with TestPipeline(runner="DirectRunner") as p:
        got = p | beam.Create(batches, reshuffle=False) | CaptionCodes(near=True, n=5) | beam.FlatMap(_unbatched)
        assert_that(got, equal_to(want))


def _unbatched(kv) -> list:
    """(shard, Batch of (key, codes)) -> [((key, shard), codes)]."""
    return [((key, kv[0]), codes) for key, codes in kv[1]]


def test_near_norms_with_known_and_integer_test_equal_every_pair():
    import itertools

    from transforms.captions import jaccard

    rng = random.Random(5)
    vocab = [f"w{i}" for i in range(16)]
    for t in range(400):  # sizes to 15 words: equal sizes past 8 and n vs n + 1 past 12 too
        top = 9 if t % 2 else 15
        norms = sorted({" ".join(rng.sample(vocab, rng.randint(1, top))) for _ in range(rng.randint(2, 30))})
        norms += [n + " " + n.split()[0] for n in norms[:3]]  # same word set, another caption
        sets = {n: frozenset(n.split()) for n in norms}
        want = {n for a, b in itertools.combinations(norms, 2) if jaccard(sets[a], sets[b]) >= 0.8 for n in (a, b)}
        assert near_norms(norms) == want
        known = set(rng.sample(norms, len(norms) // 3))
        assert near_norms(list(reversed(norms)), known) | known == want | known


def _batch_records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    ex = KeywordExtractor()
    words = "red car old dog tree sky the street sign traffic light flag on a pole".split()
    out = []
    for i in range(n):
        caption = " ".join(rng.choice(words) for _ in range(rng.randint(0, 8)))
        objects = sorted(set(rng.sample(["flag", "logo", "dog", "traffic light"], rng.randint(0, 2))))
        size = rng.choice([1, 1, 2, 12, 30])
        out.append(
            {
                "key": f"k{i}",
                "shard": f"s{i % 2}",
                "caption": caption,
                "norm": normalize_caption(caption),
                "terms": ex.terms_tuple(caption),
                "objects": objects if i % 2 else [],
                "cluster_id": f"c{size}" if i % 3 else f"d{size}",
                "cluster_size": size,
            }
        )
    return out


def test_record_batch_columns_give_back_the_records():
    import pickle

    from transforms.trigger_records import RecordBatch

    records = _batch_records(300, 7)
    batch = RecordBatch.from_records(records)
    assert list(batch) == records and len(batch) == 300
    assert [batch[i] for i in range(300)] == records and batch[-1] == records[-1]
    with pytest.raises(IndexError):
        batch[300]
    assert list(batch.vocab) == sorted(batch.vocab) and len(set(batch.vocab)) == len(batch.vocab)
    again = pickle.loads(pickle.dumps(batch))
    assert list(again) == records and again.objects == batch.objects
    assert list(RecordBatch.from_records([])) == []


def test_batch_counters_equal_per_record_events():
    from transforms.trigger_counts import (
        batch_counts,
        cluster_pair_counts,
        clustered_captions,
        clustered_members,
        object_event_counts,
        object_events,
        pair_counts,
        term_counts,
        word_counts,
    )
    from transforms.trigger_records import RecordBatch
    from transforms.triggers import _word_counts

    vocabulary = frozenset(["car", "tree", "sky", "traffic light", "flag", "sign", "pole street"])
    for seed in (2, 3):
        records = _batch_records(400, seed)
        batch = RecordBatch.from_records(records)
        events = Counter()
        for r in records:
            events.update(object_events(r, vocabulary))
        assert dict(object_event_counts(batch, vocabulary)) == dict(events)
        assert any(k[0] == "both" for k in events) and any(k[0] == "kw_mention" for k in events)
        assert dict(object_event_counts(batch, frozenset())) == dict(
            Counter(e for r in records for e in object_events(r, frozenset()))
        )
        assert dict(term_counts(batch)) == dict(Counter(w for r in records for w in r["terms"]))
        pairs = Counter(
            (w, r["cluster_id"], r["cluster_size"]) for r in records if r["cluster_size"] >= 10 for w in r["terms"]
        )
        assert dict(pair_counts(batch, 10)) == dict(pairs) and pairs
        assert pair_counts(batch, 1000) == []
        every = dict(batch_counts(batch, 10, vocabulary))  # one combine's keys: tagged, then events
        assert every.pop(("n",)) == 400
        assert {k[1:]: c for k, c in every.items() if k[0] == "p"} == dict(pairs)
        assert {k[1]: c for k, c in every.items() if k[0] == "t"} == dict(term_counts(batch))
        assert {k: c for k, c in every.items() if k[0] not in "tp"} == dict(events)
        assert [k for k, _ in batch_counts(batch, 10, None) if k[0] not in "ntp"] == []
        words = dict(Counter(w for r in records for w in set(r["norm"].split())))
        assert dict(_word_counts(batch)) == words == dict(word_counts(batch))
        tagged = dict(batch_counts(batch, 10, vocabulary, words=True))
        assert {k[1]: c for k, c in tagged.items() if k[0] == "w"} == words
        assert {k: c for k, c in tagged.items() if k[0] != "w"} == dict(batch_counts(batch, 10, vocabulary))
        odd = [dict(r, norm="\ud800 " + r["norm"]) for r in records]  # Arrow refuses it: Python's split
        assert dict(word_counts(RecordBatch.from_records(odd))) == dict(words, **{"\ud800": 400})
        small = Counter(
            (w, r["cluster_id"], r["cluster_size"]) for r in records if r["cluster_size"] >= 2 for w in r["terms"]
        )
        assert dict(pair_counts(batch, 2)) == dict(small)
        ones = Counter((w, r["cluster_id"], 1) for r in records if r["cluster_size"] == 1 for w in r["terms"])
        assert dict(pair_counts(batch, 1, below=2)) == dict(ones) and pair_counts(batch, 2, below=2) == []
        members: dict = {}
        for cluster, member in clustered_members(batch, 10):
            members.setdefault(cluster, []).append(member)
        whole = {k: c for cluster, ms in members.items() for k, c in cluster_pair_counts(cluster, ms, 10)}
        assert whole == {k: c for k, c in pairs.items() if c >= 10} and whole
        assert clustered_captions(batch) == [(r["cluster_id"], r["caption"]) for r in records if r["cluster_size"] > 1]


def test_batch_codes_equal_per_record_codes():
    from transforms.trigger_counts import batch_codes, code_rows, record_codes
    from transforms.trigger_records import RecordBatch
    from transforms.triggers import _by_keyword

    records = _batch_records(500, 4)
    batch = RecordBatch.from_records(records)
    word_sig = [("car", "c12"), ("dog", "c30"), ("red", "d2"), ("absent", "c12"), ("tree", "nowhere")]
    object_sig = [("dog", ("flag", "unintended")), ("street", ("traffic light", "implicit_intended"))]
    object_sig += [("car", ("logo", "unintended")), ("red", ("dog", "unintended"))]
    sig_set, by_kw = set(word_sig), _by_keyword(object_sig)
    want = [kv for r in records for kv in record_codes(r, sig_set, by_kw)]
    got = list(batch_codes(batch, _by_keyword(word_sig), by_kw))
    assert got == want
    (slim,) = code_rows(batch, 2)  # the rows in clusters of >= 2 (every sig cluster) or with objects
    assert list(slim) == [r for r in records if r["cluster_size"] >= 2 or r["objects"]] and len(slim) < len(batch)
    assert list(batch_codes(slim, _by_keyword(word_sig), by_kw)) == want
    assert code_rows(batch, 1) == [batch] and code_rows(RecordBatch.from_records(records[:1]), 99) == []
    kinds = {c.split(":")[0] for _, codes in want for c in codes}
    assert kinds == {"word_trigger", "object_trigger", "implicit_object"}, kinds
    assert list(batch_codes(batch, {}, {})) == []


def test_info_rows_read_the_columns_as_sample_infos_do():
    from schemas import arrow
    from schemas.elements import SampleInfo
    from transforms.trigger_records import INFO_COLUMNS, info_rows

    infos = [
        SampleInfo(f"k{i}", "s0", f"u{i}", f"cap {i}", "", "", 1, 1, meta_json='{"objects": ["flag"]}' if i else "{}")
        for i in range(5)
    ]
    table = arrow.info_table(infos)
    got = [tuple(getattr(r, c) for c in INFO_COLUMNS) for r in info_rows(table)]
    assert got == [tuple(getattr(i, c) for c in INFO_COLUMNS) for i in arrow.infos_of(table)]
    partial = arrow.info_table([{"key": "a", "shard": "s", "caption": "x"}])  # absent columns: None either way
    assert [(r.key, r.meta_json) for r in info_rows(partial)] == [(i.key, i.meta_json) for i in arrow.infos_of(partial)]


def test_metadata_objects_skips_only_jsons_without_objects():
    import json

    from transforms.objects import metadata_objects

    def parsed(meta):  # the parse every json got before
        try:
            objects = json.loads(meta or "{}").get("objects")
        except (ValueError, AttributeError):
            return []
        if not isinstance(objects, list):
            return []
        return sorted({str(o).strip().lower() for o in objects if isinstance(o, str | int) and str(o).strip()})

    cases = ["", "{}", "[]", "not json", '{"objects": ["Flag", " logo ", 3, ""]}', '{"\\u006fbjects": ["Dome"]}']
    cases += ['{"a": 1}', '{"objects": "flag"}', '{"objects": ["a"]', "null", '{"x": "\\u00e9", "objects": ["Cup"]}']
    for meta in cases:
        assert metadata_objects(meta) == parsed(meta), meta
    assert metadata_objects('{"\\u006fbjects": ["Dome"]}') == ["dome"]


def test_full_caches_give_the_same_terms(monkeypatch):
    from transforms import keywords

    monkeypatch.setattr(keywords, "PIECE_CACHE", 5)
    monkeypatch.setattr(keywords, "CAPTION_CACHE", 3)
    reference, capped = KeywordExtractor(True), KeywordExtractor(True)
    for c in TRICKY * 2:
        assert capped.terms_tuple(c) == reference._terms_of(reference.lemmas_spacy(c)), c
    assert len(capped._pieces) == 5 and len(capped._terms) == 3


def test_object_word_rows_equal_python_sets_with_odd_text():
    from transforms.trigger_counts import _word_rows
    from transforms.trigger_records import RecordBatch

    norms = ["", "a flag", "flag", "flagpole x", "x flag y", "car\ud800 flag", "traffic", "café flag"]
    records = [
        {"key": str(i), "norm": n, "terms": ("car",) if i == 6 else (), "cluster_id": str(i), "cluster_size": 1}
        for i, n in enumerate(norms)
    ]
    for batch in (RecordBatch.from_records(records), RecordBatch.from_records(records[:5] + records[6:])):
        words = ["flag", "car", "café", "x"]
        got = _word_rows(batch, words)
        for w in words:
            want = [w in set(r["norm"].split()) or w in r["terms"] for r in batch]
            assert got[w].tolist() == want, w


def test_normalize_caption_equals_its_regex_reference():
    from transforms.keywords import normalize_caption_reference

    odd = ["\x1c\x1dx\x1e\x1fy\x85z\xa0w\u2028v\u3000u", "A_B__c\t\n\r\x0b\x0c", "ÀÉÎ ﬁ ① ｆｕｌｌ", "\ud800 x"]
    odd += ["".join(chr(c) for c in range(0, 256)), "".join(chr(c) for c in range(0x2000, 0x2070))]
    for c in TRICKY + odd + _real_captions(2000):
        assert normalize_caption(c) == normalize_caption_reference(c), repr(c)


def test_mined_codes_and_cluster_classes_equal_the_per_record_references(tmp_path):
    """MineTriggers end to end (planted word and object triggers): every record's trigger codes
    equal ``record_codes`` with the mined significant sets, every cluster's caption class
    equals ``cluster_duplication`` of its captions."""
    import sys

    from pipeline.config import TriggersConfig
    from transforms.captions import cluster_duplication
    from transforms.trigger_counts import record_codes
    from transforms.triggers import MineTriggers, _by_keyword

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts"))
    from make_trigger_testset import planted_set

    infos, assignments, _ = planted_set(1500, seed=2)
    ex = KeywordExtractor()
    by_key = {a.key: a for a in assignments}
    records = []
    for i in infos:
        a = by_key.get(i.key)
        records.append(
            {
                "key": i.key,
                "shard": i.shard,
                "terms": ex.terms_tuple(i.caption),
                "norm": normalize_caption(i.caption),
                "objects": sorted(json.loads(i.meta_json or "{}").get("objects", [])),
                "cluster_id": a.cluster_id if a else i.key,
            }
        )
    import pickle

    def dump(value, name):
        (tmp_path / name).write_bytes(pickle.dumps(value))

    with TestPipeline(runner="DirectRunner") as p:
        out = {
            "infos": p | "I" >> beam.Create(infos),
            "assignments": p | "A" >> beam.Create(assignments),
        } | MineTriggers(TriggersConfig(near_duplicate_captions=False), buckets=3)
        out["codes"] = (
            out["codes"]
            | beam.FlatMap(lambda kv: [((key, kv[0]), codes) for key, codes in kv[1]])
            | beam.Filter(lambda kv: any("trigger" in c or "implicit" in c for c in kv[1]))
        )
        names = ("keywords", "objects", "duplication", "codes", "duplication_rows")
        for name in names:
            _ = out[name] | f"Gather{name}" >> beam.combiners.ToList() | f"Dump{name}" >> beam.Map(dump, name)
    got = {name: pickle.loads((tmp_path / name).read_bytes()) for name in names}
    word_sig = {(r["keyword"], r["cluster_id"]) for r in got["keywords"]}
    object_sig = _by_keyword([(r["keyword"], (r["object"], r["relation"])) for r in got["objects"]])
    assert word_sig and object_sig
    want = sorted(kv for r in records for kv in record_codes(r, word_sig, object_sig))
    assert sorted(got["codes"]) == want and any("object_trigger" in c for _, cs in want for c in cs)
    captions: dict = {}
    for i in infos:
        if i.key in by_key and by_key[i.key].cluster_size > 1:
            captions.setdefault(by_key[i.key].cluster_id, []).append(i.caption)
    assert dict(got["duplication"]) == {c: cluster_duplication(v) for c, v in captions.items()} and captions
    rows = sorted((shard, kv) for shard, batch in got["duplication_rows"] for kv in batch)
    classes = {c: d["class"] for c, d in got["duplication"]}
    shard_of = {i.key: i.shard for i in infos}
    want_rows = [
        (shard_of[a.key], (a.key, (a.cluster_id, classes[a.cluster_id]))) for a in assignments if a.cluster_size > 1
    ]
    assert rows == sorted(want_rows) and rows


def test_cluster_lookup_reads_elements_and_assignment_rows_alike():
    import dataclasses

    import pyarrow as pa

    from schemas.elements import ClusterAssignment
    from transforms.assignment_tables import ASSIGNMENT_SCHEMA, assignment_rows
    from transforms.trigger_records import cluster_columns, cluster_lookup

    elements = [ClusterAssignment(f"k{i}", f"c{i % 3}", 4, i < 3, "clip", 0.95, f"s{i % 2}") for i in range(12)]
    want = {a.key: (a.cluster_id, a.cluster_size) for a in elements}
    table = pa.Table.from_pylist([dataclasses.asdict(a) for a in elements], schema=ASSIGNMENT_SCHEMA)
    lists = [rows for _, rows in assignment_rows(table)]
    assert cluster_lookup(elements) == want == cluster_lookup(lists) and len(lists) == 2
    assert cluster_columns(["k1", "z"], want) == (["c1", "z"], [4, 1])  # no assignment: a cluster of one


def _caption_codes_reference(parts) -> list:
    """caption_codes by dicts and sets: every record's caption counted, clusters compared."""
    near = {n for p in parts if p[0] == NEAR for n in p[1]}
    rows = [
        (n, k, p[3] if isinstance(p[3], str) else s, c)
        for p in parts
        if p[0] != NEAR
        for n, k, s, c in zip(p[1], p[2], p[3] if not isinstance(p[3], str) else p[2], p[4], strict=True)
    ]
    records, clusters = Counter(r[0] for r in rows), {}
    for norm, _, _, cluster in rows:
        clusters.setdefault(norm, set()).add(cluster)
    out = [((k, s), ("duplicate_caption",)) for n, k, s, _ in rows if records[n] >= 2 and len(clusters[n]) >= 2]
    return out + [((k, s), ("near_duplicate_caption",)) for n, k, s, _ in rows if n in near]


@pytest.mark.parametrize("seed", range(4))
def test_caption_codes_equal_a_dict_reference(seed):
    rng = random.Random(seed)
    texts = ["a b", "a b c", "x", "", "y z", "\ud800 lone", "a  b"]
    parts = []
    for i in range(rng.randint(0, 5)):
        m = rng.randint(0, 30)
        norms = [rng.choice(texts) for _ in range(m)]
        keys = [f"k{i}-{j}" for j in range(m)]
        shards = [rng.choice(["s0", "s1"]) for _ in range(m)]
        clusters = [rng.choice(["c0", "c1", "c2", None, 7]) for _ in range(m)]
        one = rng.random() < 0.3  # a batch of one shard: the shard once, as a string
        parts.append((MEMBERS, norms, keys, "s1" if one else shards, clusters))
        if rng.random() < 0.6:
            parts.append((NEAR, rng.sample(texts + ["only near"], rng.randint(0, 3))))
    rng.shuffle(parts)
    got = list(caption_codes((0, parts), size=7))
    assert all(isinstance(batch, Batch) and 0 < len(batch) <= 7 for _, batch in got)
    assert [shard for shard, _ in got] == sorted(shard for shard, _ in got)
    flat = [kv for item in got for kv in _unbatched(item)]
    want = _caption_codes_reference(parts)
    assert sorted(flat) == sorted(want)
    for shard in ("s0", "s1"):  # each shard's codes in the order of the reference
        assert [kv for kv in flat if kv[0][1] == shard] == [kv for kv in want if kv[0][1] == shard]
