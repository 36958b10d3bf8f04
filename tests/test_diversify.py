import random
from collections import Counter

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipeline.config import DiversifyConfig
from schemas.elements import Annotation
from transforms.diversify import (
    STRATEGIES,
    DiversifyCaptions,
    alternatives,
    caption_word_repetition,
    caption_words,
    cluster_captions,
    diversify_row,
    multiple_caption,
    random_caption,
    random_number_addition,
    random_token_addition,
    vocabulary_from_counts,
)

VOCAB = ["zebra", "lamp", "ocean", "violin", "desert"]
CAPTION = "an astronaut in a white suit"
CAPTIONS = [CAPTION, "x", "a a a", "close-up of a tabby cat, stock image", "  padded   caption  ", "ünïcode café photo"]


@pytest.mark.parametrize("seed", range(20))
def test_each_strategy_has_the_shape_methods_gives(seed):
    rng = random.Random(seed)
    for caption in CAPTIONS:
        words = caption.split()
        rt = random_token_addition(caption, VOCAB, rng).split()  # RT: 2 vocabulary tokens inserted
        assert len(rt) == len(words) + 2 and Counter(rt) - Counter(words) == Counter(w for w in rt if w in VOCAB)
        assert [w for w in rt if w not in VOCAB] == [w for w in words if w not in VOCAB]  # order kept
        cwr = caption_word_repetition(caption, rng).split()  # CWR: 2 of its own words repeated
        assert len(cwr) == len(words) + 2 and set(cwr) == set(words)
        assert sum((Counter(cwr) - Counter(words)).values()) == 2
        rc = random_caption(VOCAB, rng).split()  # RC: 4 random tokens, the caption dropped
        assert len(rc) == 4 and set(rc) <= set(VOCAB)
        rna = random_number_addition(caption, rng).split()  # RNA: one integer inserted
        assert len(rna) == len(words) + 1
        extra = Counter(rna) - Counter(words)
        assert sum(extra.values()) == 1 and next(iter(extra)).isdigit()


def test_mc_is_another_caption_of_the_cluster():
    rng = random.Random(0)
    others = [CAPTION, "an astronaut, official portrait", " ", "an astronaut in a white suit "]
    assert multiple_caption(CAPTION, others, rng) == "an astronaut, official portrait"
    assert multiple_caption(CAPTION, [CAPTION, ""], rng) == ""
    assert alternatives("k", CAPTION, [CAPTION], VOCAB, ("MC",), seed=0) == []


def test_deterministic_given_the_seed():
    others = ["another caption", "a third caption", CAPTION]
    a = alternatives("k1", CAPTION, others, VOCAB, STRATEGIES, seed=7)
    assert a == alternatives("k1", CAPTION, list(reversed(others)), VOCAB, STRATEGIES, seed=7)
    assert a != alternatives("k1", CAPTION, others, VOCAB, STRATEGIES, seed=8)
    assert a != alternatives("k2", CAPTION, others, VOCAB, STRATEGIES, seed=7)
    assert [s for s, _ in a] == list(STRATEGIES)
    # one strategy's draw does not depend on which others are asked for
    assert dict(alternatives("k1", CAPTION, others, VOCAB, ("RC",), seed=7))["RC"] == dict(a)["RC"]


@pytest.mark.parametrize("caption", ["", " ", "x", "a a a", "zebra lamp ocean violin", CAPTION])
def test_alternatives_never_empty_nor_equal(caption):
    for seed in range(30):
        for strategy, alt in alternatives("k", caption, [caption, "other"], VOCAB[:1], STRATEGIES, seed):
            assert alt.strip() and alt.strip() != caption.strip(), (strategy, alt)


def test_rc_redraws_when_it_reproduces_the_caption():
    # with a one-word vocabulary RC can only draw "zebra zebra zebra zebra": never returned for that caption
    got = dict(alternatives("k", "zebra zebra zebra zebra", [], ["zebra"], ("RC", "RT"), seed=0))
    assert "RC" not in got and got["RT"].split() == ["zebra"] * 6


def test_cwr_gives_nothing_for_an_empty_caption():
    got = dict(alternatives("k", "", ["other"], VOCAB, STRATEGIES, seed=0))
    assert set(got) == {"MC", "RT", "RC", "RNA"}
    assert len(got["RT"].split()) == 2 and len(got["RC"].split()) == 4


def test_row_records_gaussian_noise_and_bounds_the_alternatives():
    row = {"key": "k", "shard": "s", "caption": CAPTION}
    out = diversify_row(row, [], VOCAB, DiversifyConfig(), seed=0)
    assert out["gaussian_noise_sigma"] == pytest.approx(0.1)
    assert out["strategy"] == ",".join(out["alternative_strategies"]) == "RT,CWR,RC,RNA"
    two = diversify_row(row, [], VOCAB, DiversifyConfig(n_alternatives=2, gaussian_noise_sigma=0.3), seed=0)
    assert two["alternative_strategies"] == ["RT", "CWR"] and two["alternatives"] == out["alternatives"][:2]
    assert two["gaussian_noise_sigma"] == pytest.approx(0.3)
    assert diversify_row(row, [], VOCAB, DiversifyConfig(strategies=("MC",)), seed=0) is None


def test_vocabulary_is_the_runs_common_words():
    assert caption_words("A cat, a Cat and 3 dogs") == ["and", "cat", "dogs"]
    assert vocabulary_from_counts([("b", 2), ("a", 2), ("c", 5), ("d", 1)], size=2) == ["c", "a"]
    assert vocabulary_from_counts([("b", 2), ("a", 2), ("c", 5), ("d", 1)]) == ["c", "a", "b"]  # singletons out
    assert vocabulary_from_counts([("q", 1), ("p", 1)]) == ["p", "q"]  # unless there is nothing else
    assert cluster_captions(["b", "a", "", "b", "c"], limit=2) == ["a", "b"]


def _annotations():
    def a(key, caption, cluster, size, rep):
        return Annotation(
            key=key,
            shard="s0",
            caption=caption,
            cluster_id=cluster,
            cluster_size=size,
            is_representative=rep,
            duplication="full" if size > 1 else "",
        )

    return [
        a("k1", "a red apple on a table", "k1", 3, True),
        a("k2", "a red apple on the table", "k1", 3, False),
        a("k3", "red apple, stock photo", "k1", 3, False),
        a("k4", "a green pear on a table", "k4", 1, True),
        Annotation(key="k5", shard="s0", status="failed", failure_stage="decode", failure_type="corrupt_image"),
    ]


def test_beam_transform_matches_the_pure_functions():
    """The pipeline's DiversifyCaptions and the pure path (which re-decide uses) give the same rows."""
    cfg = DiversifyConfig()
    anns = _annotations()
    rows = [
        {
            "key": x.key,
            "shard": x.shard,
            "caption": x.caption,
            "cluster_id": x.cluster_id or x.key,
            "decision": "diversify" if x.key in ("k1", "k4") else "drop",
        }
        for x in anns
    ]
    counts = Counter(w for x in anns if x.status == "ok" for w in caption_words(x.caption))
    vocab = vocabulary_from_counts(list(counts.items()), cfg.vocabulary_size)
    pool = cluster_captions([x.caption for x in anns[:3]], cfg.max_cluster_captions)
    expected = [diversify_row(rows[0], pool, vocab, cfg, 5), diversify_row(rows[3], [], vocab, cfg, 5)]
    assert dict(zip(expected[0]["alternative_strategies"], expected[0]["alternatives"], strict=True))["MC"] in pool
    assert "MC" not in expected[1]["alternative_strategies"]

    def flat(r):
        return r["key"], r["caption"], tuple(r["alternatives"]), r["strategy"], r["gaussian_noise_sigma"]

    with TestPipeline(runner="DirectRunner") as p:
        got = {"rows": p | "Rows" >> beam.Create(rows), "annotations": p | "Anns" >> beam.Create(anns)} | (
            DiversifyCaptions(cfg, seed=5)
        )
        assert_that(got | beam.Map(flat), equal_to([flat(e) for e in expected]))
