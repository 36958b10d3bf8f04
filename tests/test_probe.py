"""Probe invariants on a tiny random-weight model of the lab's architecture."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from pipeline.lab import save_untrained
from transforms.probe import MagnitudeScorer, ProbeError, calibrate, load_probe, token_attribution

CAPTIONS = ["a red house by the sea", "an astronaut riding a horse", "", "a cat", "the moon over a quiet lake"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_untrained(str(tmp_path_factory.mktemp("probe") / "tiny"), seed=1)


@pytest.fixture(scope="module")
def pm(model_dir):
    return load_probe(model_dir, "cpu")


def test_empty_caption_scores_zero(pm):
    scores = MagnitudeScorer(pm).score(CAPTIONS)
    assert scores[2] == 0.0 and (scores[[0, 1, 3, 4]] > 0).all()


def test_score_does_not_depend_on_the_batch(pm):
    scorer = MagnitudeScorer(pm, seeds=2)
    together = scorer.score(CAPTIONS)
    alone = np.array([scorer.score([c])[0] for c in CAPTIONS])
    assert np.allclose(together, alone, rtol=1e-4, atol=1e-6)
    shuffled = scorer.score(CAPTIONS[::-1])[::-1]
    assert np.allclose(together, shuffled, rtol=1e-4, atol=1e-6)


def test_same_seeds_same_scores(model_dir):
    a = MagnitudeScorer(load_probe(model_dir, "cpu"), seeds=2).score(CAPTIONS)
    b = MagnitudeScorer(load_probe(model_dir, "cpu"), seeds=2).score(CAPTIONS)
    assert np.array_equal(a, b)


def test_forwards_per_caption(pm):
    scorer = MagnitudeScorer(pm, seeds=1)
    pm.forwards = 0
    batch = 4
    for i in range(0, 16, batch):
        scorer.magnitude([f"caption {j}" for j in range(i, i + batch)])
    assert pm.forwards / 16 <= 1 + 1 / batch  # one forward per batch, plus one cached uncond per seed


def test_anisotropy_and_attribution(pm):
    scores = MagnitudeScorer(pm).score(CAPTIONS[:2], metric="anisotropy")
    assert scores.shape == (2,) and np.all(np.abs(scores) <= 1)
    tokens = token_attribution(pm, "an astronaut riding a horse")
    assert tokens[0][0] == "<|startoftext|>" and any("astronaut" in t for t, _ in tokens)
    assert all(v >= 0 for _, v in tokens)


def test_calibration():
    assert calibrate(np.arange(100.0), 0.05) == 95.0


def test_vocabulary_guard(model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):  # a tokenizer folder without its vocabulary
        (broken / "tokenizer" / name).unlink()
    with pytest.raises(ProbeError, match="tokens"):
        load_probe(str(broken), "cpu")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "probe",
            "--model",
            str(broken),
            "--captions",
            str(tmp_path / "c.txt"),
            "--output",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "tokens" in proc.stderr


def test_probe_commands(model_dir, tmp_path):
    caps = tmp_path / "caps.txt"
    caps.write_text("\n".join(CAPTIONS[:2] + CAPTIONS[3:]) + "\n")
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "probe",
            "--model",
            model_dir,
            "--captions",
            str(caps),
            "--output",
            str(out),
            "--reference",
            str(caps),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    import pyarrow.parquet as pq

    assert pq.read_table(out / "scores" / "part-all.parquet").num_rows == 4
    assert json.loads((out / "scores" / "calibration.json").read_text())["threshold"] is not None
    res = tmp_path / "eval.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "probe-eval",
            "--model",
            model_dir,
            "--memorized",
            str(caps),
            "--reference",
            str(caps),
            "--output",
            str(res),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 0.0 <= json.loads(res.read_text())["auc"] <= 1.0


def test_lab_model_separates_memorized_captions():
    """The committed lab model (scripts/train_lab.py) memorizes its fully duplicated captions."""
    from pathlib import Path

    from transforms.probe import auc

    lab = Path(__file__).resolve().parent.parent / "models" / "memlab"
    pm = load_probe(str(lab), "cpu")
    scorer = MagnitudeScorer(pm, seeds=2)
    memorized = (lab / "memorized.txt").read_text().splitlines()
    unseen = [
        "a man riding a wave on top of a surfboard",
        "two dogs playing in the snow",
        "a plate of pasta",
        "a red bus parked on a city street",
        "a kitchen with a stove and a sink",
        "a child flying a kite",
        "a vase of flowers on a table",
        "a train crossing a bridge",
        "an old church under a cloudy sky",
        "a woman reading a book on a bench",
    ]
    assert auc(scorer.score(memorized), scorer.score(unseen)) >= 0.95
