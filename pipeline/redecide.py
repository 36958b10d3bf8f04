"""``memsieve decide RUN_DIR --set ...``: new decisions from the stored annotations.

Nothing is re-embedded, re-clustered or re-probed: the annotations table holds every score and
cluster; only the policy runs again (in-process, one annotation part at a time), and the
manifest, diversify and blocklist tables, ``blocklist.txt``, the filtered shards (when the run
wrote them), the report and ``run.json`` are rewritten. Columns other than decision and reasons
come out as before; with no override the tables come out byte for byte as the run wrote them.

Crash safety: new tables are staged beside the old ones and swapped in by renames; ``run.json``
is moved to ``run.json.redecide`` for the duration (a run without ``run.json`` is not finished),
and a re-decide that finds only that file resumes from it.

``output=NEW`` writes the new decision set to a new folder and leaves the run untouched: NEW gets
hard links (copies across file systems) of the run's unchanged tables and report thumbnails, so
it is a complete run folder that can itself be re-decided. ``dry_run`` counts what would change
(by decision and reason) and writes nothing.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import time
from collections import Counter

from pipeline.config import ConfigError, apply_override, parse_config
from schemas import arrow
from transforms.annotate import annotation_from_row
from transforms.decide import DIVERSIFY, DROP, blocklist_row, decide, is_kept_copy, manifest_row, reason_family
from transforms.diversify import caption_words, cluster_captions, diversify_row, vocabulary_from_counts
from transforms.write import safe_part_name, write_rows

log = logging.getLogger(__name__)
TABLES = ("manifest", "diversify", "blocklist")
PENDING = "run.json.redecide"


def _load_run(run_dir: str, overrides: list[str]):
    for name in ("run.json", PENDING):  # PENDING: an earlier re-decide stopped half-way
        path = os.path.join(run_dir, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                run = json.load(f)
            raw = run["config"]
            for assignment in overrides:
                apply_override(raw, assignment)
            return run, parse_config(raw)
    raise ConfigError(f"run_dir: {run_dir} has no run.json (not a finished run)")


def _parts(run_dir: str) -> list[str]:
    folder = os.path.join(run_dir, "annotations")
    if not os.path.isdir(folder):
        raise ConfigError(f"run_dir: {run_dir} has no annotations/ table")
    return sorted(os.path.join(folder, p) for p in os.listdir(folder) if p.endswith(".parquet"))


def _kept_copies(parts: list[str], cfg) -> dict[str, tuple[str, str]]:
    """cluster id -> (key, url) of the member it keeps (one entry per duplicate cluster)."""
    import pyarrow.parquet as pq

    kept = {}
    for path in parts:
        for r in pq.read_table(path).to_pylist():
            if not r["is_representative"] or (r["cluster_size"] or 1) < 2 or r["status"] != "ok":
                continue
            a = annotation_from_row(r)
            row = manifest_row(a, decide(a, cfg.decide)[0], [])
            pair = (row["key"], row["url"] or "")
            if is_kept_copy(row) and pair < kept.get(row["cluster_id"], (chr(0x10FFFF),)):
                kept[row["cluster_id"]] = pair
    return kept


def _cluster_context(parts: list[str], cfg) -> tuple[dict[str, list[str]], list[str]]:
    """First pass: captions per duplicate cluster (bounded) and the run's vocabulary, as the
    pipeline's DiversifyCaptions computes them."""
    import pyarrow.parquet as pq

    captions: dict[str, list[str]] = {}
    words: Counter = Counter()
    for path in parts:
        for r in pq.read_table(path, columns=["status", "caption", "cluster_id", "cluster_size"]).to_pylist():
            if r["status"] != "ok" or not r["caption"]:
                continue
            words.update(caption_words(r["caption"]))
            if (r["cluster_size"] or 1) > 1:
                captions.setdefault(r["cluster_id"], []).append(r["caption"])
    limit = cfg.diversify.max_cluster_captions
    pools = {c: cluster_captions(v, limit) for c, v in captions.items()}
    return pools, vocabulary_from_counts(list(words.items()), cfg.diversify.vocabulary_size)


def _clear_staging(run_dir: str) -> None:
    for table in TABLES:
        for stale in glob.glob(os.path.join(run_dir, f"{table}.tmp-*")) + glob.glob(
            os.path.join(run_dir, f"{table}.old-*")
        ):
            shutil.rmtree(stale, ignore_errors=True)


def _swap_in(run_dir: str, table: str, staged: str) -> None:
    final = os.path.join(run_dir, table)
    old = f"{final}.old-{os.getpid()}"
    if os.path.isdir(final):
        os.replace(final, old)
    os.replace(staged, final)
    if os.path.isdir(old):
        shutil.rmtree(old)


def _decide_part(path: str, cfg, context, staged: dict, counts: dict) -> None:
    """One annotations part -> the same-named manifest, diversify and blocklist parts."""
    import pyarrow.parquet as pq

    pools, vocab, kept = context
    rows = []
    for r in pq.read_table(path).to_pylist():
        a = annotation_from_row(r)
        decision, reasons = decide(a, cfg.decide)
        rows.append(manifest_row(a, decision, reasons))
        counts["decide"][decision] += 1
        counts["decide_reason"].update(reason_family(x) for x in reasons)
    if not rows:
        return
    name = f"part-{safe_part_name(rows[0]['shard'])}.parquet"
    write_rows(os.path.join(staged["manifest"], name), rows, arrow.MANIFEST)
    div = []
    if cfg.diversify.enabled:
        for r in rows:
            if r["decision"] == DIVERSIFY:
                d = diversify_row(r, pools.get(r["cluster_id"], []), vocab, cfg.diversify, cfg.run.seed)
                div.extend([d] if d is not None else [])
    if div:
        write_rows(os.path.join(staged["diversify"], name), div, arrow.DIVERSIFY)
    blocked = [blocklist_row(r, kept.get(r["cluster_id"])) for r in rows if r["decision"] == DROP]
    if blocked:
        write_rows(os.path.join(staged["blocklist"], name), blocked, arrow.BLOCKLIST)


def _stage_decisions(run_dir: str, cfg) -> tuple[dict, dict]:
    parts = _parts(run_dir)
    context = (*_cluster_context(parts, cfg), _kept_copies(parts, cfg))
    staged = {t: os.path.join(run_dir, f"{t}.tmp-{os.getpid()}") for t in TABLES}
    for folder in staged.values():
        os.makedirs(folder, exist_ok=True)
    counts = {"decide": Counter(), "decide_reason": Counter()}
    for path in parts:
        _decide_part(path, cfg, context, staged, counts)
    return staged, counts


def redecide(run_dir: str, overrides: list[str], output: str | None = None) -> dict:
    """Re-decide a finished run with ``overrides`` (``stage.key=value``); returns the new run.json.
    ``output``: write the new decision set there (a new or empty folder); the run is only read."""
    from pipeline import outdir

    if not os.path.isdir(run_dir):
        raise ConfigError(f"run_dir: {run_dir} is not a folder")
    _load_run(run_dir, overrides)  # a bad override exits 2 before the folder is touched
    if output and os.path.abspath(output) != os.path.abspath(run_dir):
        return _redecide(run_dir, overrides, output)  # RUN is only read: no lock file written into it
    with outdir.locked(os.path.abspath(run_dir)):  # never alongside a run on the same folder
        return _redecide(run_dir, overrides)


def _redecide(run_dir: str, overrides: list[str], output: str | None = None) -> dict:
    from pipeline import runinfo
    from pipeline.job import RUN_TABLES, _maybe_report, _summary, write_blocklist_txt

    started = time.time()
    run, cfg = _load_run(run_dir, overrides)
    if output and os.path.abspath(output) != os.path.abspath(run_dir):
        from pipeline.decide_output import prepare_output

        prepare_output(run_dir, output)
        run["decided_from"] = os.path.abspath(run_dir)
        run_dir = output
        cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": os.path.abspath(output)})})
    _clear_staging(run_dir)
    staged, counts = _stage_decisions(run_dir, cfg)
    if os.path.isfile(os.path.join(run_dir, "run.json")):
        os.replace(os.path.join(run_dir, "run.json"), os.path.join(run_dir, PENDING))
    for table, folder in staged.items():
        _swap_in(run_dir, table, folder)
    n_blocked = write_blocklist_txt(run_dir)
    decided = time.time()
    table_counts = runinfo.table_counts(run_dir, RUN_TABLES)
    run["config"] = cfg.model_dump(mode="json")
    run["outputs"] = dict(run.get("outputs", {}), **table_counts, blocklist_urls=n_blocked)
    run["summary"] = _summary(run_dir, table_counts)
    for namespace, counter in counts.items():
        run.setdefault("counters", {})[namespace] = dict(sorted(counter.items()))
    timings = run.setdefault("timings_s", {})
    timings["redecide"] = round(decided - started, 3)
    _rewrite_filtered(run_dir, run, cfg)
    timings["redecide_filtered"] = round(time.time() - decided, 3)
    run.setdefault("redecided", []).append({"overrides": list(overrides), "seconds": round(time.time() - started, 3)})
    report_started = time.time()
    _maybe_report(cfg, run_dir, run, reuse_figures=True)
    timings["redecide_report"] = round(time.time() - report_started, 3)
    timings["redecide_total"] = round(time.time() - started, 3)
    run["checksums"] = runinfo.checksums(run_dir, RUN_TABLES)
    runinfo.write_run_json(os.path.join(run_dir, "run.json"), run)
    if os.path.isfile(os.path.join(run_dir, PENDING)):
        os.remove(os.path.join(run_dir, PENDING))
    log.info("re-decided %s in %.2f s: %s", run_dir, timings["redecide_total"], dict(counts["decide"]))
    return run


def _rewrite_filtered(run_dir: str, run: dict, cfg) -> None:
    """The filtered shards follow the new decisions (input shards are copied, not decoded)."""
    shards = run.get("input", {}).get("shards", [])
    if not cfg.output.filtered_shards or run.get("input", {}).get("format") != "webdataset":
        stale = os.path.join(run_dir, "filtered")
        if os.path.isdir(stale):  # shards filtered by the old decisions would mislead
            shutil.rmtree(stale)
            run["outputs"].pop("filtered_samples", None)
        return
    from transforms.filtered_shards import write_filtered_shards

    run["outputs"]["filtered_samples"] = write_filtered_shards(run_dir, shards, cfg.diversify)


def dry_run(run_dir: str, overrides: list[str]) -> dict:
    """What ``redecide`` would change, counted; nothing is written."""
    import pyarrow.parquet as pq

    _, cfg = _load_run(run_dir, overrides)
    manifest_dir = os.path.join(run_dir, "manifest")
    before, after = Counter(), Counter()
    transitions, reasons_before, reasons_after = Counter(), Counter(), Counter()
    for path in _parts(run_dir):
        old_path = os.path.join(manifest_dir, os.path.basename(path))
        old = {}
        if os.path.isfile(old_path):
            old = {r["key"]: r for r in pq.read_table(old_path, columns=["key", "decision", "reasons"]).to_pylist()}
        for r in pq.read_table(path).to_pylist():
            decision, reasons = decide(annotation_from_row(r), cfg.decide)
            prev = old.get(r["key"], {"decision": "(none)", "reasons": []})
            before[prev["decision"]] += 1
            after[decision] += 1
            reasons_before.update({reason_family(x) for x in prev["reasons"] or []})
            reasons_after.update({reason_family(x) for x in reasons})
            if prev["decision"] != decision:
                transitions[f"{prev['decision']}->{decision}"] += 1
    families = sorted(set(reasons_before) | set(reasons_after))
    return {
        "run_dir": run_dir,
        "overrides": list(overrides),
        "changed": sum(transitions.values()),
        "decisions_before": dict(sorted(before.items())),
        "decisions_after": dict(sorted(after.items())),
        "transitions": dict(sorted(transitions.items())),
        "reasons": {f: {"before": reasons_before.get(f, 0), "after": reasons_after.get(f, 0)} for f in families},
    }


def format_changes(changes: dict) -> str:
    """The dry run's counts as a few aligned lines for a person."""
    lines = [
        f"dry run of {changes['run_dir']} with {' '.join(changes['overrides']) or 'no overrides'}: "
        f"{changes['changed']} decisions would change (nothing written)"
    ]
    names = sorted(set(changes["decisions_before"]) | set(changes["decisions_after"]))
    lines.append(f"  {'decision':<28} {'before':>8} {'after':>8}")
    for d in names:
        lines.append(f"  {d:<28} {changes['decisions_before'].get(d, 0):>8} {changes['decisions_after'].get(d, 0):>8}")
    for t, n in changes["transitions"].items():
        lines.append(f"  {t:<28} {n:>8}")
    lines.append(f"  {'reason':<28} {'before':>8} {'after':>8}")
    for f, c in changes["reasons"].items():
        lines.append(f"  {f:<28} {c['before']:>8} {c['after']:>8}")
    return "\n".join(lines)
