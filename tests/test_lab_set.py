"""The harder memorization lab (scripts/make_lab_set.py, scripts/mitigation_eval.py): fast checks."""

import hashlib
import io
import json
import os
import random
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def lab_set(tmp_path_factory) -> Path:
    from scripts.make_lab_set import make_lab_set

    out = tmp_path_factory.mktemp("lab-set")
    make_lab_set(str(out), singles=16, per_count=4, shards=2)
    return out


@pytest.fixture(scope="module")
def samples(lab_set):
    from scripts.mitigation_eval import read_shards

    return read_shards(str(lab_set / "shards"))


def _truth(lab_set) -> dict:
    return json.loads((lab_set / "truth.json").read_text())


def test_repeats_and_planted_cases(lab_set, samples):
    truth = _truth(lab_set)
    per_image = Counter(truth["keys"][k]["image_id"] for k in samples)
    assert set(per_image) == set(truth["images"])
    for img, info in truth["images"].items():
        assert per_image[img] == info["count"]
    assert sorted({v["count"] for v in truth["images"].values()}) == [1, 2, 4, 8, 16, 32]
    caps = defaultdict(list)
    for k, s in samples.items():
        caps[truth["keys"][k]["image_id"]].append(s["caption"])
    for img, info in truth["images"].items():
        if info["kind"] == "full":
            assert len(set(caps[img])) == 1
        elif info["kind"] == "template" and info["count"] >= 8:
            assert len(set(caps[img])) > 1 and all(" for sale - " in c for c in caps[img])
        elif info["kind"] == "trigger":
            assert sum(info["trigger"] in c.split() for c in caps[img]) > info["count"] / 2
    same = [i for i, v in truth["images"].items() if v["kind"] == "same_caption"]
    assert len(same) >= 2 and len({caps[i][0] for i in same}) == 1
    assert any(v["kind"] == "object_trigger" for v in truth["images"].values())


def test_copies_are_mostly_not_byte_identical(lab_set, samples):
    """Exact dedup finds a quarter of the copies; the rest differ in bytes (a near-dup search's job)."""
    from scripts.mitigation_eval import exact_dedup, pixels

    truth = _truth(lab_set)
    one = min(i for i, v in truth["images"].items() if v["count"] == 32)
    big = [k for k in samples if truth["keys"][k]["image_id"] == one]
    digests = Counter(hashlib.sha256(samples[k]["image"]).hexdigest() for k in big)
    assert 16 <= len(digests) < 32  # originals + exact copies collapse, edits do not
    kept = exact_dedup(samples)
    assert len(kept) <= len(samples) - sum(t["variant"] == "exact" for t in truth["keys"].values())
    assert len(set(kept) & set(big)) == len(digests)  # (two edits with the same settings may coincide)
    assert pixels(samples[big[0]]["image"]).shape == (3, 16, 16)


def test_distinct_images_are_unrelated_at_training_size(lab_set, samples):
    from scripts.make_lab_set import MAX_COS
    from scripts.mitigation_eval import centred_unit, pixels

    truth = _truth(lab_set)
    originals = [k for k in sorted(samples) if truth["keys"][k]["variant"] == "original"]
    # JPEG at 96 px then 16 px: a little above the maker's bound (measured at 16 px before encoding)
    unit = centred_unit(np.stack([pixels(samples[k]["image"]) for k in originals]))
    sims = unit @ unit.T - 2 * np.eye(len(unit))
    assert sims.max() < MAX_COS + 0.05
    from PIL import Image

    from scripts.make_lab_set import MIN_HASH_BITS, hash_bits, hash_distance

    # ... and to the copy detector (as decoded from the shards: a little under the maker's bound)
    bits = np.stack([hash_bits(Image.open(io.BytesIO(samples[k]["image"]))) for k in originals])
    assert min(hash_distance(b, np.delete(bits, i, 0)).min() for i, b in enumerate(bits)) > MIN_HASH_BITS - 16


def test_negatives_are_in_domain_and_untrained(lab_set, samples):
    truth = _truth(lab_set)
    trained = {s["caption"] for s in samples.values()}
    negs = truth["negatives"]
    assert len(negs["unseen_same_subjects"]) == 200 and not trained & set(negs["unseen_same_subjects"])
    assert negs["near_miss"] and not trained & set(negs["near_miss"])
    from scripts.make_lab_set import near_miss

    rng = random.Random(0)
    caption = "a photo of a tabby cat, amber velvet house"
    for _ in range(20):
        other = near_miss(caption, rng)
        assert other != caption and len(set(other.split()) ^ set(caption.split())) <= 2


def test_memsieve_finds_the_copies_exact_dedup_misses(lab_set, samples, tmp_path):
    """memsieve (jobs/lab.yaml) keeps exactly one sample per planted image: every copy, mirror
    images included, joins its image's cluster, and no two distinct images share a cluster."""
    from scripts.mitigation_eval import kept_per_image, run_memsieve

    truth = _truth(lab_set)
    result = run_memsieve(str(lab_set / "shards"), str(tmp_path / "run"))
    by_count = kept_per_image(result["keep"], truth)
    assert {c: set(v) for c, v in by_count.items()} == {c: {1} for c in (1, 2, 4, 8, 16, 32)}
    assert result["alternatives"] and result["p"] == 0.1 and result["sigma"] == 0.1
    from scripts.mitigation_eval import exact_dedup

    assert set(kept_per_image(exact_dedup(samples), truth)[32]) != {1}  # exact dedup leaves copies


def test_diversified_training_draws_follow_the_recipe():
    import torch

    from pipeline.lab import _diversified

    alt_ids = torch.arange(6).repeat(77, 1).T  # alternative row a is all a's
    alt_of = [[0, 1], [], [2, 3, 4]]
    tokens = torch.full((3, 77), 9)
    gn = _diversified(tokens, [0, 1, 2], alt_ids, alt_of, 1.0, random.Random(0))
    assert tokens[:, 0].tolist() == [0, 9, 2] and gn.tolist() == [True, False, True]
    tokens = torch.full((3, 77), 9)
    gn = _diversified(tokens, [0, 1, 2], alt_ids, alt_of, 0.0, random.Random(0))
    assert (tokens == 9).all() and not gn.any()
    rng, hits = random.Random(1), Counter()
    for _ in range(2000):
        tokens = torch.full((1, 77), 9)
        _diversified(tokens, [2], alt_ids, alt_of, 0.1, rng)
        hits[int(tokens[0, 0])] += 1
    assert 0.22 < 1 - hits[9] / 2000 < 0.32  # 1 - 0.9^3 = 0.271 replaced


def test_fit_keeps_the_batches_with_and_without_diversification():
    """Same seed, steps and schedule: the diversification draws use their own generator."""
    import torch

    from pipeline.lab import fit

    torch.set_num_threads(1)
    images = torch.randn(6, 3, 16, 16)
    ids = torch.randint(0, 300, (6, 77))
    empty = torch.zeros(1, 77, dtype=torch.long)
    div = {"alt_ids": torch.randint(0, 300, (2, 77)), "alt_of": [[0, 1]] + [[]] * 5, "p": 0.0, "sigma": 0.1}
    _, _, plain = fit(images, torch.arange(6), ids, empty, 300, steps=21, batch=2, seed=0, lr=1e-3)
    _, _, with_div = fit(images, torch.arange(6), ids, empty, 300, steps=21, batch=2, seed=0, lr=1e-3, div=div)
    assert plain == with_div
    div["p"] = 1.0
    _, _, changed = fit(images, torch.arange(6), ids, empty, 300, steps=21, batch=2, seed=0, lr=1e-3, div=div)
    assert changed != plain


def _gen(image, count, sim, nn, seed=0):
    return {"image": image, "count": count, "seed": seed, "sim": sim, "nn": nn, "own": sim}


def test_replication_rule_counts_own_image_copies_above_the_chance_level():
    from scripts.mitigation_eval import BINS, rates, strict_threshold, threshold

    held = [_gen("", 0, s, "img9") for s in np.linspace(0.1, 0.5, 101)]
    assert strict_threshold({"A": {"generations": held}, "B": {"generations": []}}) == pytest.approx(0.496)
    pairs = np.histogram(np.linspace(-0.5, 0.5, 1001), BINS)[0]  # unrelated-pair similarities
    both = {"A": {"unrelated_hist": pairs.tolist()}, "B": {"unrelated_hist": (2 * pairs).tolist()}}
    assert threshold(both) == pytest.approx(0.49, abs=0.006)
    gens = held + [
        _gen("a", 8, 0.9, "a"),  # a replication of its own image
        _gen("a", 8, 0.9, "b", seed=1),  # close to another image: not its own
        _gen("b", 8, 0.4, "b"),  # its own image but at the chance level
        _gen("c", 32, 0.95, "c"),
        _gen("d", 1, 0.2, "a"),
    ]
    r = rates(gens, 0.5)
    assert r["own"] == {1: 0.0, 8: pytest.approx(1 / 3), 32: 1.0}
    assert r["own_8plus"] == 0.5 and r["any_8plus"] == 0.75 and r["heldout_any"] == 0.0
    # chance: each image credited with another's (a derangement), so no own hit survives
    assert r["chance_8plus"] <= 0.25 and r["chance"][32] == 0.0


def test_table_ends_with_the_acceptance_line():
    from scripts.mitigation_eval import table

    held = [_gen("", 0, 0.3, "z")] * 10
    a = {"generations": held + [_gen("x", 32, 0.9, "x"), _gen("y", 8, 0.9, "y")], "heldout_loss": 0.2}
    b = {"generations": held + [_gen("x", 32, 0.9, "x"), _gen("y", 8, 0.2, "y")], "heldout_loss": 0.2}
    c = {"generations": held + [_gen("x", 32, 0.9, "q"), _gen("y", 8, 0.2, "y")], "heldout_loss": 0.21}
    results = json.loads(json.dumps({"A": a, "B": b, "C": c}))  # as read back from setting-*.json
    out = table(results, {"A": 10, "B": 9, "C": 5}, tau=0.5, strict=0.95).splitlines()
    assert "1.000" in next(line for line in out if line.startswith("A "))
    assert out[-1] == "replication A=1.0000 B=0.5000 C=0.0000 quality_C_over_A=1.0500"


@pytest.mark.slow
def test_mitigation_eval_runs_end_to_end(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "scripts" / "mitigation_eval.py"), "--out", str(tmp_path)]
    cmd += ["--steps", "21", "--seeds", "1", "--singles", "16", "--threads", "1", "--parallel"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, check=True).stdout
    assert out.strip().splitlines()[-1].startswith("replication A=")
    assert (tmp_path / "model_A" / "unet" / "config.json").is_file()
