import random

import pytest

from pipeline.config import DiversifyConfig
from transforms.diversify import (
    alternatives,
    caption_word_repetition,
    diversify_row,
    random_caption,
    random_number_addition,
    random_token_addition,
    vocabulary_from_counts,
)

VOCAB = ["zebra", "lamp", "ocean", "violin", "desert"]
CAPTION = "an astronaut in a white suit"


def test_shapes():
    rng = random.Random(0)
    words = CAPTION.split()
    rt = random_token_addition(CAPTION, VOCAB, rng).split()
    assert len(rt) == len(words) + 2 and sum(w in VOCAB for w in rt) == 2
    cwr = caption_word_repetition(CAPTION, rng).split()
    assert len(cwr) == len(words) + 2 and set(cwr) == set(words)
    rc = random_caption(VOCAB, rng).split()
    assert len(rc) == 4 and set(rc) <= set(VOCAB)
    rna = random_number_addition(CAPTION, rng).split()
    assert len(rna) == len(words) + 1 and sum(w.isdigit() for w in rna) == 1


def test_deterministic_and_never_empty_or_equal():
    strategies = ("MC", "RT", "CWR", "RC", "RNA")
    a = alternatives("k1", CAPTION, ["another caption", CAPTION], VOCAB, strategies, seed=7)
    b = alternatives("k1", CAPTION, ["another caption", CAPTION], VOCAB, strategies, seed=7)
    c = alternatives("k1", CAPTION, ["another caption", CAPTION], VOCAB, strategies, seed=8)
    assert a == b and a != c
    assert [s for s, _ in a] == list(strategies)
    assert dict(a)["MC"] == "another caption"
    for caption in ["", "x", "a a a"]:
        for _, alt in alternatives("k", caption, [caption], VOCAB, strategies, seed=1):
            assert alt.strip() and alt.strip() != caption.strip()


def test_mc_needs_other_captions():
    got = alternatives("k", CAPTION, [CAPTION], VOCAB, ("MC",), seed=0)
    assert got == []


def test_row_records_gaussian_noise():
    row = {"key": "k", "shard": "s", "caption": CAPTION}
    out = diversify_row(row, [], VOCAB, DiversifyConfig(), seed=0)
    assert out["gaussian_noise_sigma"] == pytest.approx(0.1)
    assert out["strategy"] == ",".join(out["alternative_strategies"]) == "RT,CWR,RC,RNA"


def test_vocabulary_ties_by_word():
    assert vocabulary_from_counts([("b", 2), ("a", 2), ("c", 5)], size=2) == ["c", "a"]
