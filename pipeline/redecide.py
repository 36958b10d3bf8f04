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
from transforms.decide import DIVERSIFY, DROP, _blocklist_columns, reason_family
from transforms.diversify import caption_words, cluster_captions, diversify_row, vocabulary_from_counts
from transforms.write import safe_part_name, write_arrow, write_rows

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
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from transforms.shard_columns import decide_columns

    kept = {}
    for path in parts:
        t = pq.read_table(path)
        rep = pc.fill_null(t.column("is_representative"), False)
        clustered = pc.greater(pc.fill_null(t.column("cluster_size"), 1), 1)
        t = t.filter(pc.and_(pc.and_(rep, clustered), pc.equal(pc.fill_null(t.column("status"), ""), "ok")))
        if not t.num_rows:
            continue
        decisions, _ = decide_columns(t, cfg.decide)
        t = t.filter(decisions != DROP)  # is_kept_copy: a representative that is not dropped
        cid = pc.fill_null(t.column("cluster_id"), "")
        cid = pc.if_else(pc.equal(cid, ""), t.column("key"), cid)
        urls = pc.fill_null(t.column("url"), "").to_pylist()
        for c, key, url in zip(cid.to_pylist(), t.column("key").to_pylist(), urls, strict=True):
            pair = (key, url)
            if pair < kept.get(c, (chr(0x10FFFF),)):
                kept[c] = pair
    return kept


def _cluster_context(parts: list[str], cfg) -> tuple[dict[str, list[str]], list[str]]:
    """First pass: captions per duplicate cluster (bounded) and the run's vocabulary, as the
    pipeline's DiversifyCaptions computes them (only diversification uses them)."""
    import pyarrow.parquet as pq

    if not cfg.diversify.enabled:
        return {}, []
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


def _count(counts: dict, decisions, reasons) -> None:
    import numpy as np
    import pyarrow.compute as pc

    names, n = np.unique(decisions.astype(str), return_counts=True)
    counts["decide"].update(dict(zip(names.tolist(), n.tolist(), strict=True)))
    for r in pc.value_counts(pc.list_flatten(reasons)).to_pylist():
        counts["decide_reason"][reason_family(r["values"])] += r["counts"]


def _blocked(manifest, dropped, kept: dict):
    """The dropped manifest rows -> their blocklist table (``blocklist_row`` with the kept copy)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    cols = _blocklist_columns(manifest.filter(pa.array(dropped)))
    names = list(kept)
    at = pc.index_in(cols.column("cluster_id"), value_set=pa.array(names, pa.string()))
    at = pc.if_else(pc.equal(cols.column("category"), "duplicate"), at, pa.scalar(None, pa.int32()))
    kept_key = pc.take(pa.array([kept[c][0] for c in names], pa.string()), at)
    kept_url = pc.take(pa.array([kept[c][1] for c in names], pa.string()), at)
    cols = cols.set_column(cols.schema.get_field_index("kept_key"), "kept_key", kept_key)
    cols = cols.set_column(cols.schema.get_field_index("kept_url"), "kept_url", kept_url)
    return pa.Table.from_arrays([cols.column(f.name) for f in arrow.BLOCKLIST], schema=arrow.BLOCKLIST)


def _decide_part(path: str, cfg, context, staged: dict, counts: dict) -> None:
    """One annotations part -> the same-named manifest, diversify and blocklist parts (columnar:
    ``decide_columns`` and ``manifest_table``, as the pipeline's shard stage)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from transforms.shard_columns import decide_columns, manifest_table

    pools, vocab, kept = context
    t = pq.read_table(path)
    if not t.num_rows:
        return
    decisions, reasons = decide_columns(t, cfg.decide)
    _count(counts, decisions, reasons)
    manifest = manifest_table(t, decisions, reasons)
    name = f"part-{safe_part_name(manifest.column('shard')[0].as_py())}.parquet"
    write_arrow(os.path.join(staged["manifest"], name), manifest)
    div = []
    if cfg.diversify.enabled and (decisions == DIVERSIFY).any():
        for r in manifest.filter(pa.array(decisions == DIVERSIFY)).to_pylist():
            d = diversify_row(r, pools.get(r["cluster_id"], []), vocab, cfg.diversify, cfg.run.seed)
            div.extend([d] if d is not None else [])
    if div:
        write_rows(os.path.join(staged["diversify"], name), div, arrow.DIVERSIFY)
    dropped = decisions == DROP
    if dropped.any():
        write_arrow(os.path.join(staged["blocklist"], name), _blocked(manifest, dropped, kept))


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


def _families_per_row(reasons) -> Counter:
    """Rows carrying each reason family (a row counts once per family, null lists as none)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(reasons, pa.ChunkedArray):
        reasons = reasons.combine_chunks()
    flat = pc.list_flatten(reasons)
    parent = pc.list_parent_indices(reasons).to_numpy()
    valid = pc.is_valid(flat).to_numpy(zero_copy_only=False)
    flat, parent = flat.filter(pa.array(valid)), parent[valid]
    if not len(flat):
        return Counter()
    uniq = pc.unique(flat)
    names, family = np.unique(np.array([reason_family(c) for c in uniq.to_pylist()], dtype=object), return_inverse=True)
    code = family[pc.index_in(flat, value_set=uniq).to_numpy()]
    rows_families = np.unique(parent.astype(np.int64) * len(names) + code)
    counts = np.bincount(rows_families % len(names), minlength=len(names))
    return Counter({f: int(c) for f, c in zip(names.tolist(), counts.tolist(), strict=True) if c})


def _value_counts(values) -> Counter:
    import pyarrow.compute as pc

    return Counter({r["values"]: r["counts"] for r in pc.value_counts(values).to_pylist()})


def _dry_part(path: str, old_path: str, cfg, tally: dict) -> None:
    """One annotations part against its manifest part (matched by key) -> the counts in ``tally``."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from transforms.shard_columns import decide_columns

    t = pq.read_table(path)
    decisions, reasons = decide_columns(t, cfg.decide)
    after = pa.array(decisions, pa.string())
    if os.path.isfile(old_path):
        old = pq.read_table(old_path, columns=["key", "decision", "reasons"])
        at = pc.index_in(t.column("key"), value_set=old.column("key").combine_chunks())
        prev = pc.fill_null(pc.take(old.column("decision"), at), "(none)")
        old_reasons = pc.take(old.column("reasons"), at)
    else:
        prev = pa.repeat(pa.scalar("(none)"), t.num_rows)
        old_reasons = pa.nulls(t.num_rows, pa.list_(pa.string()))
    tally["before"].update(_value_counts(prev))
    tally["after"].update(_value_counts(after))
    tally["reasons_before"].update(_families_per_row(old_reasons))
    tally["reasons_after"].update(_families_per_row(reasons))
    moved = pc.not_equal(prev, after)
    tally["transitions"].update(
        _value_counts(pc.binary_join_element_wise(prev.filter(moved), after.filter(moved), "->"))
    )


def dry_run(run_dir: str, overrides: list[str]) -> dict:
    """What ``redecide`` would change, counted (columnar, one annotations part at a time);
    nothing is written."""
    _, cfg = _load_run(run_dir, overrides)
    manifest_dir = os.path.join(run_dir, "manifest")
    tally = {name: Counter() for name in ("before", "after", "transitions", "reasons_before", "reasons_after")}
    for path in _parts(run_dir):
        _dry_part(path, os.path.join(manifest_dir, os.path.basename(path)), cfg, tally)
    before, after, transitions = tally["before"], tally["after"], tally["transitions"]
    reasons_before, reasons_after = tally["reasons_before"], tally["reasons_after"]
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
