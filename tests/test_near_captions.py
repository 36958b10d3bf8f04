"""Vectorised near-duplicate captions (``transforms.near_captions``) equal the band-by-band
reference: every pair of distinct captions in each MinHash band of at most MAX_BAND records."""

import random
from collections import Counter

import numpy as np
import pytest

from transforms.captions import minhash_bands
from transforms.near_captions import _band_groups, band_mix, bucket_entries, minhash_rows, near_captions
from transforms.trigger_captions import MAX_BAND, band_entries, near_in_bands, near_norms
from transforms.word_sets import _word_sets


def _reference(norms: list[str]) -> set[str]:
    counts = Counter(norms)
    by_band: dict[str, dict[str, int]] = {}
    for norm, c in counts.items():
        for band in minhash_bands(norm):
            by_band.setdefault(band, {})[norm] = c
    near: set[str] = set()
    for members in by_band.values():
        if len(members) >= 2 and sum(members.values()) <= MAX_BAND:
            near |= near_norms(members)
    return near


def _captions(seed: int, n: int, vocab: int, lo: int, hi: int) -> list[str]:
    """Word lists over a small vocabulary (many band collisions), variants by one or two edits,
    reordered duplicates of one word set, repeats, an empty caption and a flood."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(vocab)]
    bases = [rng.sample(words, rng.randint(lo, hi)) for _ in range(max(4, n // 8))]
    out = []
    for _ in range(n):
        cap = list(rng.choice(bases))
        for _ in range(rng.choice([0, 0, 1, 2])):
            op = rng.random()
            if op < 0.4:
                cap.append(rng.choice(words))
            elif op < 0.7 and len(cap) > 1:
                cap.pop(rng.randrange(len(cap)))
            else:
                cap[rng.randrange(len(cap))] = rng.choice(words)
        if rng.random() < 0.2:
            rng.shuffle(cap)
        out.append(" ".join(cap))
    return out + [""] + ["flood w1 w2 w3 w4 w5"] * (MAX_BAND + 3) + ["flood w1 w2 w3 w4 w5 w6"]


def _near_by_beam_functions(norms: list[str], n: int, batch: int) -> set[str]:
    recs = [{"norm": x} for x in norms]
    parts: dict[int, list] = {}
    for i in range(0, len(recs), batch):
        for b, part in band_entries(recs[i : i + batch], n):
            parts.setdefault(b, []).append(part)
    return {norm for item in parts.items() for _, (_, marks) in near_in_bands(item, n) for norm in marks}


@pytest.mark.parametrize(
    "seed,vocab,lo,hi,n",
    [(0, 12, 3, 8, 1), (1, 30, 6, 14, 3), (2, 40, 8, 20, 2), (3, 16, 1, 5, 4)],
)
def test_near_captions_equal_the_band_reference(seed, vocab, lo, hi, n):
    norms = _captions(seed, 700, vocab, lo, hi)
    want = _reference(norms)
    assert len(want) > 20 and (hi < 9 or any(len(set(x.split())) >= 10 for x in want))  # large sets near too
    assert _near_by_beam_functions(norms, n, 97) == want
    rng = random.Random(seed)
    shuffled = norms[:]
    rng.shuffle(shuffled)
    assert _near_by_beam_functions(shuffled, n, 251) == want


def test_minhash_rows_are_datasketch_values():
    from transforms.captions import _hashvalues

    norms = ["", "a", "b a a", "a b", "x y z " * 3]
    hv = minhash_rows(norms)
    for row, norm in zip(hv, norms, strict=True):
        assert np.array_equal(row, _hashvalues(norm, 64, 1))
    assert minhash_rows([]).shape == (0, 64)


def test_band_groups_fall_back_to_the_keys_when_hashes_collide():
    hv = minhash_rows(["a b c", "a b d", "a b c", "q r s"])
    s_idx, k_idx = np.nonzero(np.ones((4, 16), dtype=bool))
    vals = hv.reshape(4, 16, 4)[s_idx, k_idx]
    real = band_mix(hv)[s_idx, k_idx]
    some = real.copy()
    some[s_idx == 3] = real[(s_idx == 1)]  # the keys of one caption collide with another's
    for mix in (real, some, np.zeros(len(s_idx), dtype=np.uint64)):  # real, some and all colliding
        order, new = _band_groups(mix, vals, k_idx)
        keys = [(int(k), tuple(v)) for k, v in zip(k_idx[order], vals[order].tolist(), strict=True)]
        starts = np.flatnonzero(new).tolist() + [len(keys)]
        groups = [keys[a:b] for a, b in zip(starts, starts[1:], strict=False)]
        assert all(len(set(g)) == 1 for g in groups) and len({g[0] for g in groups}) == len(groups)


def test_word_sets_and_a_set_of_several_captions(monkeypatch):
    import transforms.word_sets as nc

    for norms in (["b a", "a b b", "c", "", "a b", "c d"], ["b  a", "a\tb b", " c", "", "a b", "c d "]):
        cap_set, offsets, words, v = _word_sets(norms)  # Arrow, then Python (irregular spaces)
        assert cap_set.tolist() == [0, 0, 1, 2, 0, 3] and np.diff(offsets).tolist() == [2, 1, 0, 2]
        assert words[2] == words[3] and words[2] not in words[:2] and v >= 4
        offsets_w, ids, vocab = nc.split_words(norms)
        assert [sorted(vocab[i] for i in ids[a:b]) for a, b in zip(offsets_w[:-1], offsets_w[1:], strict=True)] == [
            sorted(set(x.split())) for x in norms
        ]
    monkeypatch.setattr(nc, "_word_hashes", lambda v: np.zeros(max(1, v), dtype=np.uint64))  # every hash collides
    again = _word_sets(["b a", "a b b", "c", "", "a b", "c d"])
    assert again[0].tolist() == [0, 0, 1, 2, 0, 3] and np.diff(again[1]).tolist() == [2, 1, 0, 2]
    # two captions of one word set are near each other (Jaccard 1) in a band of few records
    norms = ["a b c d", "d c b a", "x"]
    ((_, rows, at, bands, values),) = bucket_entries(minhash_rows(norms), 1)
    got = near_captions([norms[i] for i in rows], np.array([1, 1, 1]), at, bands, values, MAX_BAND)
    assert sorted(got) == ["a b c d", "d c b a"]


def test_large_pairs_in_chunks_are_every_pair_of_a_group():
    from transforms.near_captions import _large_pairs

    rng = np.random.default_rng(4)
    sizes = rng.integers(6, 14, 60)
    gid = np.sort(rng.integers(0, 9, 150))
    members = np.concatenate([rng.permutation(60)[: int((gid == g).sum())] for g in range(9)])
    want = set()
    for g in range(9):
        group = members[gid == g]
        for i, x in enumerate(group):
            for y in group[i + 1 :]:
                la, lb = sorted((int(sizes[x]), int(sizes[y])))
                if la >= 8 and 5 * la >= 4 * lb and la + lb >= 18:
                    want.add((min(x, y), max(x, y)))
    for chunk in (5, 1 << 22):
        chunks = list(_large_pairs(members, gid, sizes, chunk))
        assert {(int(a), int(b)) for x, y in chunks for a, b in zip(x, y, strict=True)} == want
        assert len(chunks) > 1 if chunk == 5 else len(chunks) == 1


def test_subset_pairs_equal_every_pair_with_and_without_hash_collisions(monkeypatch):
    import transforms.word_sets as nc

    rng = random.Random(7)
    norms = [" ".join(rng.sample([f"w{i}" for i in range(9)], rng.randint(3, 9))) for _ in range(300)]
    cap_set, offsets, words, v = _word_sets(list(dict.fromkeys(norms)))
    sets = [frozenset(words[a:b].tolist()) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    want = {
        (i, j)
        for i, a in enumerate(sets)
        for j, b in enumerate(sets)
        if 4 <= len(a) <= 8 and a < b and len(b) == len(a) + 1
    }
    assert len(want) > 50
    among = np.ones(len(sets), dtype=bool)
    got = nc._subset_pairs(offsets, words, v, among)  # distinct word-hash sums
    assert set(zip(got[0].tolist(), got[1].tolist(), strict=True)) == want
    monkeypatch.setattr(nc, "_word_hashes", lambda v: np.ones(max(1, v), dtype=np.uint64))  # sums: sizes only
    got = nc._subset_pairs(offsets, words, v, among)  # every sum collides: every hit checked by its words
    assert set(zip(got[0].tolist(), got[1].tolist(), strict=True)) == want


@pytest.mark.parametrize("n", [1, 3])
def test_near_captions_of_irregular_text_and_of_lists_equal_the_reference(n, monkeypatch):
    import transforms.caption_texts as ct
    import transforms.trigger_captions as tc

    norms = _captions(5, 400, 14, 3, 8)
    odd = [x.replace(" ", "  ", 1) if i % 50 == 7 else x for i, x in enumerate(norms)]  # split in Python
    want = _reference(odd)
    assert any(x != " ".join(x.split()) for x in want)
    assert _near_by_beam_functions(odd, n, 61) == want
    monkeypatch.setattr(ct, "as_texts", lambda norms: norms)  # Python lists all the way
    monkeypatch.setattr(tc, "as_texts", lambda norms: norms)
    assert _near_by_beam_functions(odd, n, 61) == want


def test_bucket_entries_are_each_rows_band_keys_in_their_bucket():
    hv = minhash_rows(_captions(2, 120, 20, 3, 8))
    mix = band_mix(hv)
    seen = set()
    for b, rows, at, bands, values in bucket_entries(hv, 5):
        for r, k, vals in zip(rows[at].tolist(), bands.tolist(), values, strict=True):
            assert int(mix[r, k] >> np.uint64(1)) % 5 == b
            assert vals.tolist() == hv[r, 4 * k : 4 * k + 4].tolist()
            seen.add((r, k))
    assert seen == {(r, k) for r in range(len(hv)) for k in range(16)}


@pytest.mark.parametrize(
    "norms",
    [
        ["a b", "", "b c a", "c"],  # single spaces and an empty caption: Arrow
        ["a b", " a", "b c "],  # a leading or trailing space
        ["a  b", "b c"],  # two spaces
        ["a\tb", "b\u3000c", "c\xa0d e"],  # other spaces (split() splits them; Arrow's pattern does not)
        ["", ""],
    ],
)
def test_split_words_equal_python_split(norms):
    from transforms.caption_texts import as_texts, split_words

    offsets, ids, vocab = split_words(as_texts(norms))
    got = [[vocab[i] for i in ids[a:b]] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    assert [sorted(w) for w in got] == [sorted(set(x.split())) for x in norms]
    assert all(list(ids[a:b]) == sorted(ids[a:b]) for a, b in zip(offsets[:-1], offsets[1:], strict=True))


def test_intersections_and_equal_join_by_sorting():
    from transforms.word_sets import _equal_join, _intersections

    rng = np.random.default_rng(3)
    sets = [sorted(set(rng.integers(0, 40, rng.integers(0, 15)).tolist())) for _ in range(300)]
    offsets = np.cumsum([0] + [len(s) for s in sets])
    words = np.array([w for s in sets for w in s], dtype=np.int64)
    a, b = rng.integers(0, 300, 2000), rng.integers(0, 300, 2000)
    want = [len(set(sets[x]) & set(sets[y])) for x, y in zip(a.tolist(), b.tolist(), strict=True)]
    for limit in (1 << 24, 50, 1):  # one run, runs of pairs, a pair a run
        assert _intersections(a, b, offsets, words, 40, limit).tolist() == want
    keys = rng.integers(0, 50, 200).astype(np.uint64) << np.uint64(40)  # repeated keys, equal high bits
    query = np.concatenate([keys[:30], rng.integers(0, 2**62, 100).astype(np.uint64)])
    qi, ki = _equal_join(keys, query)
    got = set(zip(qi.tolist(), ki.tolist(), strict=True))
    exact = {(q, k) for q in range(len(query)) for k in range(len(keys)) if query[q] == keys[k]}
    assert exact <= got and len(got) == len(exact)  # high bits of random queries: no false hit here
    assert _equal_join(keys[:0], query)[0].size == 0


def test_maybe_in_keeps_every_query_equal_to_a_key_and_drops_most_others():
    from transforms.word_sets import _maybe_in

    rng = np.random.default_rng(3)
    keys = rng.integers(0, 2**63, 5000, dtype=np.int64).view(np.uint64) * np.uint64(2)
    query = np.concatenate([keys[::7], rng.integers(0, 2**63, 20000, dtype=np.int64).view(np.uint64), keys[:3]])
    rng.shuffle(query)
    got = _maybe_in(keys, query)
    assert set(np.flatnonzero(np.isin(query, keys)).tolist()) <= set(got.tolist())
    assert len(got) < np.isin(query, keys).sum() + 0.1 * 20000
    assert _maybe_in(keys[:0], query).tolist() == [] and _maybe_in(keys, query[:0]).tolist() == []


def test_slots_equal_np_repeat():
    from transforms.caption_texts import slots

    rng = np.random.default_rng(5)
    for counts in (rng.integers(0, 4, 50), np.zeros(3, dtype=np.int64), np.array([0, 0, 5]), np.array([2]), []):
        counts = np.asarray(counts, dtype=np.int64)
        first = rng.integers(0, 100, len(counts))
        run, number = slots(first, counts)
        want_run = np.repeat(np.arange(len(counts)), counts)
        assert run.tolist() == want_run.tolist()
        assert (
            number.tolist()
            == (first[want_run] + np.arange(len(want_run)) - (np.cumsum(counts) - counts)[want_run]).tolist()
        )
