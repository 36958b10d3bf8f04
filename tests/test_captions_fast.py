"""Fast paths of caption analytics equal their plain loops."""

import random

from transforms.captions import skeleton_of_norm


def test_skeleton_with_a_frozenset_equals_the_word_loop():
    rng = random.Random(3)
    vocab = ["for", "sale", "free", "shipping", "2024", "10", "lamp", "red", "x"]
    frequent = {"for", "sale", "free", "shipping", "2024", "red"}  # "2024": frequent, yet a number (a slot)
    norms = [" ".join(rng.choice(vocab) for _ in range(rng.randint(0, 7))) for _ in range(3000)]
    got = [skeleton_of_norm(n, frozenset(frequent)) for n in norms]
    assert got == [skeleton_of_norm(n, set(frequent)) for n in norms]  # a set: no fast path
    assert {None} < set(got) and "for sale *" in got and skeleton_of_norm("for sale", frozenset(frequent)) is None
