"""Memorization lab, end to end: train (unless the model exists), then measure.

    python scripts/lab_eval.py [--model models/memlab] [--retrain]
        [--unseen ../shared/data/captions/coco2014_val_10k.csv]

1. Reproduction: DDIM samples (50 steps, guidance 3) for the fully duplicated captions, compared
   with their training images (pixel cosine after centring; nearest-training-image match), and
   the same for unique training captions.
2. The probe (first-step magnitude) separating memorized captions from unseen real captions
   (AUC, TPR at 1% FPR), and memorized vs unique, partial vs unique, full vs partial.

The harder lab (scripts/make_lab_set.py; its model is setting A of scripts/mitigation_eval.py):

    python scripts/lab_eval.py --lab-set out/mitigation/lab-set --model out/mitigation/model_A

prints the probe table by duplication count: AUC and TPR at 1% FPR of magnitude and anisotropy
(n = 1 and 4 seeds) against in-domain negatives (unseen captions of the same subjects; near-miss
rewordings of the repeated images' captions).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pipeline.lab import build_dataset, generate  # noqa: E402
from pipeline.probe_cli import read_captions  # noqa: E402
from transforms.probe import MagnitudeScorer, auc, load_probe, tpr_at_fpr  # noqa: E402


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1) - a.reshape(len(a), -1).mean(1, keepdims=True)
    b = b.reshape(len(b), -1) - b.reshape(len(b), -1).mean(1, keepdims=True)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-9)


def reproduction(pm, captions: list[str], images: np.ndarray, pool: np.ndarray) -> dict:
    gen = generate(pm, captions, seed=0)
    sims = _cos(gen, images)
    flat_pool = pool.reshape(len(pool), -1)
    nearest = [int(np.argmax(_cos(np.repeat(g[None], len(pool), 0), flat_pool.reshape(pool.shape)))) for g in gen]
    target = [int(np.argmax(_cos(np.repeat(im[None], len(pool), 0), pool))) for im in images]
    return {
        "mean_pixel_cosine": float(sims.mean()),
        "min": float(sims.min()),
        "nearest_training_image_is_its_own": float(np.mean([a == b for a, b in zip(nearest, target, strict=True)])),
    }


def lab_positives(truth: dict) -> dict[str, list[str]]:
    """Trained captions by duplication count: every distinct caption, and the full-duplication ones."""
    from scripts.mitigation_eval import COUNTS

    by_id: dict[str, set] = {}
    for key in sorted(truth["keys"]):
        by_id.setdefault(truth["keys"][key]["image_id"], set()).add(truth["captions"][key])
    out: dict[str, list[str]] = {}
    for c in COUNTS:
        ids = [i for i, v in sorted(truth["images"].items()) if v["count"] == c]
        out[f"x{c} all"] = sorted({cap for i in ids for cap in by_id[i]})
        if c > 1:
            out[f"x{c} full"] = sorted(
                {truth["images"][i]["caption"] for i in ids if truth["images"][i]["kind"] == "full"}
            )
    big = [i for i, v in sorted(truth["images"].items()) if v["count"] >= 8]
    out["8+ all"] = sorted({cap for i in big for cap in by_id[i]})
    out["8+ full"] = sorted({truth["images"][i]["caption"] for i in big if truth["images"][i]["kind"] == "full"})
    return out


def lab_probe_table(model: str, lab_dir: str) -> str:
    """The probe on the harder lab, by duplication count, against in-domain negatives."""
    from scripts.mitigation_eval import read_shards

    truth = json.load(open(os.path.join(lab_dir, "truth.json")))
    truth["captions"] = {k: v["caption"] for k, v in read_shards(os.path.join(lab_dir, "shards")).items()}
    pos, negs = lab_positives(truth), truth["negatives"]
    trained = set(truth["captions"].values())
    negs = {k: [c for c in v if c not in trained] for k, v in negs.items()}
    pm = load_probe(model, "cpu")
    allcaps = sorted({c for v in list(pos.values()) + list(negs.values()) for c in v})
    lines = [f"model {model}; negatives: " + ", ".join(f"{k} {len(v)}" for k, v in negs.items())]
    lines.append(f"{'metric':<14s} {'positives':<9s} {'n':>4s}  " + "  ".join(f"AUC/TPR@1% vs {k}" for k in negs))
    for metric in ("magnitude", "anisotropy"):
        for seeds in (1, 4):
            scorer = MagnitudeScorer(pm, seeds=seeds)
            sc = np.concatenate([scorer.score(allcaps[i : i + 32], metric) for i in range(0, len(allcaps), 32)])
            score = dict(zip(allcaps, sc, strict=True))
            for name, caps in pos.items():
                p = np.array([score[c] for c in caps])
                cells = []
                for neg in negs.values():
                    n = np.array([score[c] for c in neg])
                    cells.append(f"{auc(p, n):.3f} / {tpr_at_fpr(p, n):.3f}")
                lines.append(
                    f"{metric + ' n=' + str(seeds):<14s} {name:<9s} {len(caps):4d}  "
                    + "  ".join(f"{c:<24s}" for c in cells)
                )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.path.join(ROOT, "models", "memlab"))
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument(
        "--unseen", default=os.path.join(ROOT, "..", "shared", "data", "captions", "coco2014_val_10k.csv")
    )
    parser.add_argument("--n-unseen", type=int, default=200)
    parser.add_argument("--lab-set", help="the harder lab set (scripts/make_lab_set.py): print its probe table")
    args = parser.parse_args()
    if args.lab_set:
        print(lab_probe_table(args.model, args.lab_set))
        return 0
    started = time.time()
    if args.retrain or not os.path.isfile(os.path.join(args.model, "unet", "config.json")):
        subprocess.run(
            [sys.executable, os.path.join(ROOT, "scripts", "train_lab.py"), "--output", args.model], check=True
        )
    pm = load_probe(args.model, "cpu")
    images, items, roles = build_dataset(0)
    n_full = len(roles["memorized"])
    unique_start = len(images) - len(roles["unique"])
    result = {"training": json.load(open(os.path.join(args.model, "training.json")))}
    result["reproduction_full_duplication"] = reproduction(pm, roles["memorized"], images[:n_full], images)
    result["reproduction_unique"] = reproduction(
        pm, roles["unique"][:n_full], images[unique_start : unique_start + n_full], images
    )
    if os.path.isfile(args.unseen):
        unseen = read_captions(args.unseen)[: args.n_unseen]
        source = os.path.relpath(args.unseen, ROOT)
    else:
        import random

        from pipeline.lab import _caption

        rng = random.Random(99)
        unseen, source = [_caption(rng) for _ in range(args.n_unseen)], "generated captions (no shared data)"
    scorer = MagnitudeScorer(pm, seeds=4)
    s = {
        k: np.concatenate([scorer.score(v[i : i + 32]) for i in range(0, len(v), 32)])
        for k, v in {
            "memorized": roles["memorized"],
            "partial": roles["partial"],
            "unique": roles["unique"],
            "unseen": unseen,
        }.items()
    }
    result["probe"] = {
        "unseen_source": source,
        "means": {k: float(v.mean()) for k, v in s.items()},
        "auc_memorized_vs_unseen": auc(s["memorized"], s["unseen"]),
        "tpr_at_1pct_fpr_memorized_vs_unseen": tpr_at_fpr(s["memorized"], s["unseen"]),
        "auc_memorized_vs_unique_training": auc(s["memorized"], s["unique"]),
        "auc_partial_vs_unique_training": auc(s["partial"], s["unique"]),
        "auc_full_vs_partial": auc(s["memorized"], s["partial"]),
    }
    result["seconds"] = round(time.time() - started, 1)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
