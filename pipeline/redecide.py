"""``memsieve decide RUN_DIR --set ...``: new decisions from the stored annotations.

Nothing is re-embedded, re-clustered or re-probed: the annotations table holds every score and
cluster; only the policy runs again (in-process, one annotation part at a time), and the
manifest, diversify, blocklist tables, ``blocklist.txt``, the report and ``run.json`` are
rewritten. Columns other than decision and reasons come out as before.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import Counter

from pipeline.config import ConfigError, apply_override, parse_config
from schemas import arrow
from transforms.annotate import annotation_from_row
from transforms.decide import DIVERSIFY, blocklist_row, decide, manifest_row
from transforms.diversify import diversify_row, vocabulary_from_counts
from transforms.write import safe_part_name, write_rows

log = logging.getLogger(__name__)


def _load_config(run_dir: str, overrides: list[str]):
    path = os.path.join(run_dir, "run.json")
    if not os.path.isfile(path):
        raise ConfigError(f"run_dir: {run_dir} has no run.json (not a finished run)")
    with open(path, encoding="utf-8") as f:
        run = json.load(f)
    raw = run["config"]
    for assignment in overrides:
        apply_override(raw, assignment)
    return run, parse_config(raw)


def _parts(run_dir: str) -> list[str]:
    folder = os.path.join(run_dir, "annotations")
    if not os.path.isdir(folder):
        raise ConfigError(f"run_dir: {run_dir} has no annotations/ table")
    return sorted(os.path.join(folder, p) for p in os.listdir(folder) if p.endswith(".parquet"))


def _cluster_context(parts: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """First pass: captions per duplicate cluster (bounded) and the run's vocabulary."""
    import pyarrow.parquet as pq

    captions: dict[str, set[str]] = {}
    words: Counter = Counter()
    for path in parts:
        t = pq.read_table(path, columns=["status", "caption", "cluster_id", "cluster_size"]).to_pylist()
        for r in t:
            if r["status"] != "ok" or not r["caption"]:
                continue
            words.update({w.lower() for w in r["caption"].split() if w.isalpha()})
            if (r["cluster_size"] or 1) > 1:
                captions.setdefault(r["cluster_id"], set()).add(r["caption"])
    return {c: sorted(v)[:20] for c, v in captions.items()}, vocabulary_from_counts(list(words.items()))


def _swap_in(run_dir: str, table: str, staged: str) -> None:
    final = os.path.join(run_dir, table)
    old = f"{final}.old-{os.getpid()}"
    if os.path.isdir(final):
        os.replace(final, old)
    os.replace(staged, final)
    if os.path.isdir(old):
        shutil.rmtree(old)


def redecide(run_dir: str, overrides: list[str]) -> dict:
    import pyarrow.parquet as pq

    from pipeline import runinfo
    from pipeline.job import RUN_TABLES, _maybe_report, _summary, write_blocklist_txt

    started = time.time()
    run, cfg = _load_config(run_dir, overrides)
    parts = _parts(run_dir)
    cluster_caps, vocab = _cluster_context(parts)
    staged = {t: os.path.join(run_dir, f"{t}.tmp-{os.getpid()}") for t in ("manifest", "diversify", "blocklist")}
    decisions: Counter = Counter()
    for path in parts:
        rows = []
        for r in pq.read_table(path).to_pylist():
            a = annotation_from_row(r)
            decision, reasons = decide(a, cfg.decide)
            rows.append(manifest_row(a, decision, reasons))
            decisions[decision] += 1
        if not rows:
            continue
        name = f"part-{safe_part_name(rows[0]['shard'])}.parquet"
        write_rows(os.path.join(staged["manifest"], name), rows, arrow.MANIFEST)
        div = [
            d
            for r in rows
            if r["decision"] == DIVERSIFY and cfg.diversify.enabled
            for d in [diversify_row(r, cluster_caps.get(r["cluster_id"], []), vocab, cfg.diversify, cfg.run.seed)]
            if d is not None
        ]
        if div:
            write_rows(os.path.join(staged["diversify"], name), div, arrow.DIVERSIFY)
        blocked = [blocklist_row(r) for r in rows if r["decision"] == "drop"]
        if blocked:
            write_rows(os.path.join(staged["blocklist"], name), blocked, arrow.BLOCKLIST)
    for table, folder in staged.items():
        os.makedirs(folder, exist_ok=True)
        _swap_in(run_dir, table, folder)
    os.remove(os.path.join(run_dir, "run.json"))  # the run is "in progress" until run.json is back
    n_blocked = write_blocklist_txt(run_dir)
    counts = runinfo.table_counts(run_dir, RUN_TABLES)
    run["config"] = cfg.model_dump(mode="json")
    run["outputs"] = dict(counts, blocklist_urls=n_blocked)
    run["summary"] = _summary(run_dir, counts)
    run.setdefault("counters", {})["decide"] = dict(sorted(decisions.items()))
    run.setdefault("redecided", []).append({"overrides": list(overrides), "seconds": round(time.time() - started, 3)})
    decided = time.time()
    _maybe_report(cfg, run_dir, run, reuse_figures=True)
    run["timings_s"]["redecide"] = round(time.time() - started, 3)
    run["timings_s"]["redecide_report"] = round(time.time() - decided, 3)
    run["checksums"] = runinfo.checksums(run_dir, RUN_TABLES)
    runinfo.write_run_json(os.path.join(run_dir, "run.json"), run)
    log.info("re-decided %s in %.2f s: %s", run_dir, run["timings_s"]["redecide"], dict(decisions))
    return run
