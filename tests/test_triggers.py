import os
import sys

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that

from pipeline.config import TriggersConfig
from transforms.captions import cluster_duplication, near_duplicate_groups, skeleton, template_groups
from transforms.keywords import KeywordExtractor, normalize_caption
from transforms.objects import calibrate, related_fn, zero_shot_tags
from transforms.trigger_stats import bh_qvalues, hypergeom_pvalue, npmi
from transforms.triggers import MineTriggers

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts"))
from make_trigger_testset import planted_set  # noqa: E402


def test_keywords_lemmas_and_stopwords():
    ex = KeywordExtractor()
    assert ex.terms("The astronauts are running on the Moon, 3 times!") == ["astronaut", "moon", "run", "time"]
    assert KeywordExtractor(bigrams=True).terms("red flags waving") == ["flag", "flag wave", "red", "red flag", "wave"]


def test_stats():
    assert npmi(10, 10, 10, 100) == pytest.approx(1.0)
    assert npmi(1, 10, 10, 100) == pytest.approx(0.0, abs=1e-9)
    assert hypergeom_pvalue(10, 1000, 10, 10) < 1e-20
    assert hypergeom_pvalue(0, 1000, 10, 10) == pytest.approx(1.0)
    q = bh_qvalues([0.01, 0.04, 0.03, 0.5])
    assert list(np.round(q, 4)) == [0.04, 0.0533, 0.0533, 0.5]


def test_cluster_duplication_full_and_partial():
    full = cluster_duplication(["A cat.", "a cat", "A CAT!", "a dog"])
    assert full["class"] == "full" and full["modal_share"] == 0.75
    partial = cluster_duplication(["a cat on a mat", "a sleepy kitten", "tabby cat indoors"])
    assert partial["class"] == "partial" and partial["diversity"] > 0.5


def test_templates_and_near_duplicates():
    caps = [f"{w} for sale - free shipping" for w in ("lamp", "sofa", "chair", "desk", "rug")] + ["a dog"] * 3
    groups = template_groups(caps, min_df=5, min_count=5, min_distinct=3)
    assert list(groups.values()) == [[0, 1, 2, 3, 4]]
    assert (
        skeleton("lamp for sale - free shipping", frozenset("for sale free shipping".split()))
        == "* for sale free shipping"
    )
    near = near_duplicate_groups(
        [
            "a man riding a horse on the beach at sunset",
            "a man riding a horse on the beach at sunset!!",
            "a man riding a brown horse on the beach at sunset",
            "two cats",
        ]
    )
    assert near == [[0, 1, 2]] or near == [[1, 2, 0]] or sorted(map(sorted, near)) == [[0, 1, 2]]
    assert normalize_caption("Café, au LAIT!") == "café au lait"


def test_clip_object_tagging_with_fake_embeddings():
    rng = np.random.default_rng(0)
    text = np.eye(3, 8)  # three objects along three axes
    images = rng.normal(0, 0.05, (50, 8))
    images[:, 7] += 1.0  # what every photo shares
    images[:5, 0] += 0.6  # five images show object 0
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    thresholds = calibrate(images @ text.T, z=2.0)
    tags = zero_shot_tags(images, text, ["flag", "logo", "text"], thresholds)
    assert [i for i, t in enumerate(tags) if "flag" in t] == [0, 1, 2, 3, 4]
    assert not any("logo" in t for t in tags)


def test_related_by_allow_list_and_embeddings():
    fake = {"mosque": np.array([1.0, 0.1]), "minaret": np.array([0.9, 0.2]), "logo": np.array([0.0, 1.0])}
    related = related_fn(("espresso:cup",), text_embed=lambda words: [fake[w] for w in words], threshold=0.9)
    assert related("espresso", "cup") and related("mosque", "minaret") and not related("mosque", "logo")


def _mine(shuffled: bool):
    infos, assignments, truth = planted_set(2000, seed=1, shuffled=shuffled)
    cfg = TriggersConfig(near_duplicate_captions=False)
    got = {}
    with TestPipeline(runner="DirectRunner") as p:
        out = {
            "infos": p | "I" >> beam.Create(infos),
            "assignments": p | "A" >> beam.Create(assignments),
        } | MineTriggers(cfg)

        def check_words(rows):
            found = {(r["keyword"], r["cluster_id"]) for r in rows}
            assert found == truth["word"], (found, truth["word"])
            assert all(r["q_value"] <= 0.01 for r in rows)

        def check_objects(rows):
            found = {(r["keyword"], r["object"], r["relation"]) for r in rows}
            assert found == truth["object"], (found, truth["object"])

        assert_that(out["keywords"], check_words, label="words")
        assert_that(out["objects"], check_objects, label="objects")
    return got


def test_planted_triggers_found():
    _mine(shuffled=False)


def test_shuffled_keywords_report_nothing():
    _mine(shuffled=True)


def test_near_duplicate_band_marks_the_same_keys_as_every_pair():
    """Comparing distinct captions once marks the same members as comparing every pair."""
    import random

    from transforms.captions import jaccard
    from transforms.triggers import _near_dup_keys

    rng = random.Random(3)
    words = "red car old mosque near the river at night blue sky".split()
    base = words[:6]  # base plus one more word: Jaccard 6/7; two random captions: far apart
    options = [base, base + ["night"], base + ["sky"], rng.sample(words, 6), rng.sample(words, 4)]
    members = [(f"k{i}", " ".join(rng.choice(options))) for i in range(40)]
    expected = set()
    for i, (ka, na) in enumerate(members):
        for kb, nb in members[i + 1 :]:
            if na != nb and jaccard(frozenset(na.split()), frozenset(nb.split())) >= 0.8:
                expected |= {ka, kb}
    got = [k for k, code in _near_dup_keys(("band", members))]
    assert len(got) == len(set(got)) and set(got) == expected and expected


def test_cached_minhash_bands_match_datasketch_and_pruned_near_pairs_match_all_pairs():
    import itertools
    import random

    from datasketch import MinHash

    from transforms.captions import jaccard, minhash_bands
    from transforms.keywords import normalize_caption
    from transforms.triggers import _near_norms

    rng = random.Random(3)
    vocab = [f"w{i}" for i in range(12)]
    captions = ["", "!!", "a", "A b a", "a b c d", "a b c d e"]
    captions += [" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 9))) for _ in range(200)]
    for c in captions:  # datasketch itself, one MinHash per caption
        mh = MinHash(num_perm=64, seed=1)
        mh.update_batch([w.encode() for w in sorted(set(normalize_caption(c).split()))])
        want = [f"{b}:" + ",".join(str(int(x)) for x in mh.hashvalues[b * 4 : (b + 1) * 4]) for b in range(16)]
        assert minhash_bands(c) == want
    for _ in range(30):
        norms = sorted({normalize_caption(c) for c in rng.sample(captions, 25)})
        sets = {n: frozenset(n.split()) for n in norms}
        want = {n for a, b in itertools.combinations(norms, 2) if jaccard(sets[a], sets[b]) >= 0.8 for n in (a, b)}
        assert _near_norms(norms) == want
    assert _near_norms(["a b c d", "a b c d e"]) == {"a b c d", "a b c d e"}  # 4/5: exactly 0.8
