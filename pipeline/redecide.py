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
it is a complete run folder that can itself be re-decided. ``pipeline.redecide_dry`` counts what
would change (by decision and reason) and writes nothing.

Annotation parts are read twice: a first pass of the columns the policy and the context need
(kept copies, the vocabulary, the captions of clusters with a row to diversify), then the whole
part to write its manifest, blocklist and diversify parts. Diversify rows of keys diversified
before and now are taken from the run's diversify/ table when ``diversify.*`` and ``run.seed``
are unchanged (``_reusable_diversify``); only the others are drawn.
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
from transforms.diversify import vocabulary_from_counts
from transforms.write import safe_part_name, write_arrow

log = logging.getLogger(__name__)
TABLES = ("manifest", "diversify", "blocklist")
TO_DIVERSIFY = ("key", "shard", "caption", "cluster_id")  # what ``diversify_table`` reads
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


# the annotations columns ``decide_columns`` reads: the first pass reads these (and key, url, caption)
DECIDE_INPUTS = (
    "status",
    "failure_stage",
    "failure_type",
    "cluster_id",
    "cluster_size",
    "is_representative",
    "cluster_embedder",
    "cluster_similarity",
    "duplication",
    "trigger_codes",
    "probe_score",
    "probe_flagged",
)


def _context(parts: list[str], cfg) -> tuple[dict[str, list[str]], list[str], object]:
    """First pass (one read per part, of the columns it needs), columnar: the diversification
    context as the pipeline's DiversifyCaptions computes it (captions per duplicate cluster of a
    row to diversify, bounded, and the run's vocabulary) and the kept copies (``_kept_table``)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from transforms.decide_columns import decide_columns
    from transforms.diversify import caption_word_counts

    diversify = cfg.diversify.enabled
    columns = ["key", "url", *DECIDE_INPUTS] + (["caption"] if diversify else [])
    reps, words, captions, wanted = [], [], [], []
    for path in parts:
        t = pq.read_table(path, columns=columns)
        decisions, _ = decide_columns(t, cfg.decide)
        ok = pc.equal(pc.fill_null(t.column("status"), ""), "ok").to_numpy(zero_copy_only=False)
        clustered = ok & (pc.fill_null(t.column("cluster_size"), 1).to_numpy(zero_copy_only=False) > 1)
        rep = pc.fill_null(t.column("is_representative"), False).to_numpy(zero_copy_only=False).astype(bool)
        cid = pc.fill_null(t.column("cluster_id"), "")
        cid = pc.if_else(pc.equal(cid, ""), t.column("key"), cid)  # the manifest's cluster_id
        kept = clustered & rep & (decisions != DROP)  # is_kept_copy: a representative not dropped
        reps.append(pa.table({"cluster_id": cid, "key": t.column("key"), "url": pc.fill_null(t.column("url"), "")}))
        reps[-1] = reps[-1].filter(pa.array(kept))
        if not diversify:
            continue
        words.append(caption_word_counts(t.column("caption").filter(pa.array(ok))))
        has_caption = pc.fill_null(pc.not_equal(t.column("caption"), ""), False).to_numpy(zero_copy_only=False)
        captions.append(t.select(["cluster_id", "caption"]).filter(pa.array(clustered & has_caption)))
        wanted.append(pc.unique(cid.filter(pa.array(decisions == DIVERSIFY))))
    kept = _kept_table(reps)
    if not diversify:
        return {}, [], kept
    return _pools(captions, wanted, cfg.diversify.max_cluster_captions), _vocabulary(words, cfg), kept


def _kept_table(reps: list):
    """Kept-copy candidates (cluster_id, key, url) -> one row per cluster, its least (key, url)."""
    import numpy as np
    import pyarrow as pa

    if not reps:
        return pa.table({c: pa.array([], pa.string()) for c in ("cluster_id", "key", "url")})
    t = pa.concat_tables(reps).sort_by([("cluster_id", "ascending"), ("key", "ascending"), ("url", "ascending")])
    cid = t.column("cluster_id").to_numpy(zero_copy_only=False)
    first = np.ones(len(cid), bool)
    first[1:] = cid[1:] != cid[:-1]
    return t.filter(pa.array(first)).combine_chunks()


def _vocabulary(words: list, cfg) -> list[str]:
    """Per-part (word, count) tables -> the run's vocabulary (``vocabulary_from_counts``)."""
    import pyarrow as pa

    if not words:
        return vocabulary_from_counts([], cfg.diversify.vocabulary_size)
    summed = pa.concat_tables(words).group_by("word").aggregate([("count", "sum")])
    counts = zip(summed.column("word").to_pylist(), summed.column("count_sum").to_pylist(), strict=True)
    return vocabulary_from_counts(list(counts), cfg.diversify.vocabulary_size)


def _pools(captions: list, wanted: list, limit: int) -> dict[str, list[str]]:
    """(cluster_id, caption) tables of clustered rows -> ``cluster_captions`` of each cluster
    that has a row to diversify (sorted distinct captions, the first ``limit``)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if not captions:
        return {}
    ids = pc.unique(pa.chunked_array(wanted, pa.string()).combine_chunks())
    t = pa.concat_tables(captions)
    t = t.filter(pc.is_in(t.column("cluster_id"), value_set=ids))
    t = t.group_by(["cluster_id", "caption"]).aggregate([])  # distinct pairs
    t = t.sort_by([("cluster_id", "ascending"), ("caption", "ascending")])
    cid = t.column("cluster_id").to_numpy(zero_copy_only=False)
    start = np.flatnonzero(np.r_[True, cid[1:] != cid[:-1]]) if len(cid) else np.zeros(0, int)
    rank = np.arange(len(cid)) - np.repeat(start, np.diff(np.r_[start, len(cid)]))
    t = t.filter(pa.array(rank < limit))
    pools: dict[str, list[str]] = {}
    for c, caption in zip(t.column("cluster_id").to_pylist(), t.column("caption").to_pylist(), strict=True):
        pools.setdefault(c, []).append(caption)
    return pools


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


def _blocked(manifest, dropped, kept):
    """The dropped manifest rows -> their blocklist table (``blocklist_row`` with the kept copy;
    ``kept``: the kept copies' table, one row per cluster)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    cols = _blocklist_columns(manifest.filter(pa.array(dropped)))
    at = pc.index_in(cols.column("cluster_id"), value_set=kept.column("cluster_id"))
    at = pc.if_else(pc.equal(cols.column("category"), "duplicate"), at, pa.scalar(None, pa.int32()))
    for name in ("kept_key", "kept_url"):
        column = pc.take(kept.column(name.removeprefix("kept_")), at)
        cols = cols.set_column(cols.schema.get_field_index(name), name, column)
    return pa.Table.from_arrays([cols.column(f.name) for f in arrow.BLOCKLIST], schema=arrow.BLOCKLIST)


def _reusable_diversify(source: str, cfg) -> str | None:
    """``source``'s diversify/ folder when its rows can be reused: a diversify row is a function of
    the sample's key, caption and cluster captions, the run's vocabulary (all from annotations,
    which a re-decide never changes), ``diversify.*`` and ``run.seed``, not of the decision. So
    the rows of keys diversified before and now are those of the folder when ``source``'s
    ``run.json`` (a finished decision set) was made with the same diversify settings and seed."""
    path = os.path.join(source, "run.json")
    folder = os.path.join(source, "diversify")
    if not cfg.diversify.enabled or not os.path.isfile(path) or not os.path.isdir(folder):
        return None
    with open(path, encoding="utf-8") as f:
        before = parse_config(json.load(f)["config"])
    same = before.diversify == cfg.diversify and before.run.seed == cfg.run.seed
    return folder if same else None


def _diversified(todo, cfg, context, old_part: str | None):
    """The rows to diversify (``TO_DIVERSIFY`` columns, manifest order) -> their diversify/ table:
    rows of ``old_part`` (``_reusable_diversify``) where it has the key, ``diversify_table`` (the
    pipeline's columnar ``diversify_row``) for the others, in ``todo``'s order."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from transforms import diversify_columns

    pools, vocab, _ = context
    found = np.zeros(todo.num_rows, bool)
    reused = arrow.DIVERSIFY.empty_table()
    if old_part and os.path.isfile(old_part):
        old = pq.read_table(old_part)
        at = pc.fill_null(pc.index_in(todo.column("key"), value_set=old.column("key")), -1).to_numpy()
        found = at >= 0
        rows = old.take(pa.array(at[found], pa.int64()))
        reused = pa.Table.from_arrays([rows.column(f.name) for f in arrow.DIVERSIFY], schema=arrow.DIVERSIFY)
    parts = [reused]
    rest = todo.filter(pa.array(~found))
    made = diversify_columns.diversify_table(rest, pools, vocab, cfg.diversify, cfg.run.seed) if rest.num_rows else None
    if made is not None:  # the pipeline's columnar diversify_row (with the shard column)
        parts.append(pa.Table.from_arrays([made.column(f.name) for f in arrow.DIVERSIFY], schema=arrow.DIVERSIFY))
    table = pa.concat_tables(parts)
    at = pc.index_in(table.column("key"), value_set=todo.column("key")).to_numpy()
    return table.take(pa.array(np.argsort(at, kind="stable"), pa.int64()))


def _decide_part(path: str, cfg, context, staged: dict, counts: dict, old_diversify: str | None) -> None:
    """One annotations part -> the same-named manifest, diversify and blocklist parts (columnar:
    ``decide_columns`` and ``manifest_table``, as the pipeline's shard stage)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from transforms.decide_columns import decide_columns, manifest_table

    t = pq.read_table(path)
    if not t.num_rows:
        return
    decisions, reasons = decide_columns(t, cfg.decide)
    _count(counts, decisions, reasons)
    manifest = manifest_table(t, decisions, reasons)
    name = f"part-{safe_part_name(manifest.column('shard')[0].as_py())}.parquet"
    write_arrow(os.path.join(staged["manifest"], name), manifest)
    if cfg.diversify.enabled and (decisions == DIVERSIFY).any():
        todo = manifest.select(TO_DIVERSIFY).filter(pa.array(decisions == DIVERSIFY))
        old_part = os.path.join(old_diversify, name) if old_diversify else None
        div = _diversified(todo, cfg, context, old_part)
        if div.num_rows:
            write_arrow(os.path.join(staged["diversify"], name), div)
    dropped = decisions == DROP
    if dropped.any():
        write_arrow(os.path.join(staged["blocklist"], name), _blocked(manifest, dropped, context[2]))


def _stage_decisions(run_dir: str, cfg, source: str) -> tuple[dict, dict]:
    """The new tables, staged beside the old ones; ``source``: the run whose decision set is
    replaced (``run_dir`` itself, or the run an ``--output`` re-decide reads)."""
    parts = _parts(run_dir)
    context = _context(parts, cfg)
    old_diversify = _reusable_diversify(source, cfg)
    staged = {t: os.path.join(run_dir, f"{t}.tmp-{os.getpid()}") for t in TABLES}
    for folder in staged.values():
        os.makedirs(folder, exist_ok=True)
    counts = {"decide": Counter(), "decide_reason": Counter()}
    for path in parts:
        _decide_part(path, cfg, context, staged, counts, old_diversify)
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
    source = run_dir
    if output and os.path.abspath(output) != os.path.abspath(run_dir):
        from pipeline.decide_output import prepare_output

        prepare_output(run_dir, output)
        run["decided_from"] = os.path.abspath(run_dir)
        run_dir = output
        cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": os.path.abspath(output)})})
    _clear_staging(run_dir)
    staged, counts = _stage_decisions(run_dir, cfg, source)
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
