"""``memsieve probe`` and ``memsieve probe-eval``: score caption files with the memorization probe."""

from __future__ import annotations

import json
import os
import time

import numpy as np


def read_captions(path: str) -> list[str]:
    """One caption a line (.txt), or a caption/prompt field (.jsonl), or a caption-like column (.csv/.parquet)."""
    if path.endswith(".jsonl"):
        out = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    out.append(str(next(row[k] for k in ("caption", "prompt", "text", "Caption") if k in row)))
        return out
    if path.endswith((".csv", ".parquet")):
        import pandas as pd

        df = pd.read_parquet(path) if path.endswith(".parquet") else pd.read_csv(path, sep=None, engine="python")
        col = next(c for c in df.columns if c.lower() in ("caption", "prompt", "text", "captions", "prompts"))
        return [str(c) for c in df[col].dropna()]
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def _score_all(scorer, captions: list[str], batch: int, metric: str) -> np.ndarray:
    return (
        np.concatenate([scorer.score(captions[i : i + batch], metric) for i in range(0, len(captions), batch)])
        if captions
        else np.empty(0)
    )


def probe_main(args) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from schemas import arrow
    from transforms.probe import MagnitudeScorer, calibrate, load_probe

    pm = load_probe(args.model, args.device)
    scorer = MagnitudeScorer(pm, seeds=args.seeds)
    captions = read_captions(args.captions)
    t = time.perf_counter()
    scores = _score_all(scorer, captions, args.batch_size, args.metric)
    elapsed = time.perf_counter() - t
    threshold = None
    if args.reference:
        threshold = calibrate(
            _score_all(scorer, read_captions(args.reference), args.batch_size, args.metric), args.target_fpr
        )
    os.makedirs(os.path.join(args.output, "scores"), exist_ok=True)
    rows = [
        {
            "key": f"{i:08d}",
            "score": float(s),
            "metric": args.metric,
            "model": pm.name,
            "threshold": threshold,
            "flagged": bool(threshold is not None and s > threshold),
        }
        for i, s in enumerate(scores)
    ]
    table = pa.Table.from_pylist(rows, schema=arrow.SCORES).append_column("caption", pa.array(captions, pa.string()))
    pq.write_table(table, os.path.join(args.output, "scores", "part-all.parquet"))
    calib = {
        "model": args.model,
        "metric": args.metric,
        "seeds": args.seeds,
        "threshold": threshold,
        "target_fpr": args.target_fpr,
        "reference": args.reference,
        "captions": len(captions),
        "seconds": round(elapsed, 3),
        "unet_forwards": pm.forwards,
    }
    with open(os.path.join(args.output, "scores", "calibration.json"), "w") as f:
        json.dump(calib, f, indent=1)
    print(json.dumps(calib))
    return 0


def probe_eval_main(args) -> int:
    from transforms.probe import MagnitudeScorer, auc, load_probe, tpr_at_fpr

    pm = load_probe(args.model, args.device)
    scorer = MagnitudeScorer(pm, seeds=args.seeds)
    pos = _score_all(scorer, read_captions(args.memorized), args.batch_size, args.metric)
    neg = _score_all(scorer, read_captions(args.reference), args.batch_size, args.metric)
    result = {
        "model": args.model,
        "metric": args.metric,
        "seeds": args.seeds,
        "memorized": len(pos),
        "reference": len(neg),
        "auc": auc(pos, neg),
        "tpr_at_1pct_fpr": tpr_at_fpr(pos, neg, 0.01),
        "mean_memorized": float(pos.mean()),
        "mean_reference": float(neg.mean()),
    }
    print(json.dumps(result, indent=1))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def add_probe_parsers(sub) -> None:
    common = [
        ("--model", {"required": True, "help": "a diffusers folder or hub id"}),
        ("--seeds", {"type": int, "default": 1}),
        ("--batch-size", {"type": int, "default": 16}),
        ("--metric", {"choices": ["magnitude", "anisotropy"], "default": "magnitude"}),
        ("--device", {"default": "auto"}),
    ]
    probe = sub.add_parser("probe", help="score a caption file (one caption a line) into DIR/scores/")
    probe.add_argument("--captions", required=True)
    probe.add_argument("--output", required=True)
    probe.add_argument("--reference", help="captions known not to be memorized: calibrate the threshold")
    probe.add_argument("--target-fpr", type=float, default=0.01)
    ev = sub.add_parser("probe-eval", help="AUC and TPR at 1%% FPR of memorized vs reference captions")
    ev.add_argument("--memorized", required=True)
    ev.add_argument("--reference", required=True)
    ev.add_argument("--output", help="also write the result as JSON here")
    for p in (probe, ev):
        for flag, kw in common:
            p.add_argument(flag, **kw)
    probe.set_defaults(func=probe_main)
    ev.set_defaults(func=probe_eval_main)
