"""Decide over whole columns: ``decide_columns`` is ``transforms.decide.decide`` for every row of
an annotations table (the same decisions and reason codes, in the same order), and
``manifest_table`` is ``manifest_row`` for every row. The per-shard stage
(``transforms.shard_stage``) and ``memsieve decide`` (``pipeline.redecide``) both use them.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas import arrow
from transforms.decide import DECISIONS, DIVERSIFY, DROP, KEEP

EMPTY = pa.array([], pa.string())
# ``decide_codes``' decisions: an int8 per row, the position of its decision in ``DECISIONS``
KEEP_CODE, DIVERSIFY_CODE, DROP_CODE = (DECISIONS.index(d) for d in (KEEP, DIVERSIFY, DROP))


def _np(col, fill=None) -> np.ndarray:
    if fill is not None:
        col = pc.fill_null(col, fill)
    return col.to_numpy(zero_copy_only=False)


def _equal(col, value: str) -> np.ndarray:
    """A string column == ``value`` (null: False) as a numpy bool array, compared by Arrow."""
    return _np(pc.equal(col, value), False).astype(bool)


def decide_columns(t: pa.Table, cfg) -> tuple[np.ndarray, pa.ListArray]:
    """``decide`` for every row of an annotations table -> (decisions, reason code lists)."""
    codes, reasons = decide_codes(t, cfg)
    return np.array(DECISIONS, dtype=object)[codes], reasons


def decide_codes(t: pa.Table, cfg) -> tuple[np.ndarray, pa.ListArray]:
    """``decide_columns`` with each decision as its position in ``DECISIONS`` (int8; no string per row)."""
    n = t.num_rows
    failed = ~_equal(t.column("status"), "ok")
    size = _np(t.column("cluster_size"), 1)
    rep = _np(t.column("is_representative"), True).astype(bool)
    if cfg.probe_threshold is None:
        flagged = _np(t.column("probe_flagged"), False).astype(bool)
    else:
        flagged = _np(pc.greater_equal(t.column("probe_score"), cfg.probe_threshold), False).astype(bool)
    ok = ~failed
    dup = ok & (size > 1) & ~rep & bool(cfg.drop_duplicates)
    dup &= _np(t.column("cluster_similarity"), 1.0) >= cfg.min_duplicate_similarity
    probe_drop = ok & flagged & bool(cfg.drop_flagged_probe)
    dropped = dup | probe_drop
    notes = ok & ~dropped
    full = notes & _equal(t.column("duplication"), "full") & (size >= max(2, cfg.min_full_duplication_size))
    full &= bool(cfg.diversify_full_duplication)
    rows = np.arange(n)
    pieces = []  # (rows, slot, position, values): a row's reasons in (slot, position) order
    if failed.any():
        f = rows[failed]
        text = pc.binary_join_element_wise(
            "failed", pc.fill_null(t.column("failure_stage"), ""), pc.fill_null(t.column("failure_type"), ""), ":"
        )
        pieces.append((f, 0, f, pc.take(text, pa.array(f))))
    if dup.any():
        d = rows[dup]
        emb = pc.take(t.column("cluster_embedder"), pa.array(d))
        emb = pc.if_else(pc.equal(pc.fill_null(emb, ""), ""), "exact", emb)
        pieces.append((d, 1, d, pc.binary_join_element_wise("duplicate", emb, ":")))
    for mask, slot, code in ((probe_drop, 2, "memorized:probe"), (full, 3, "full_duplication")):
        if mask.any():
            pieces.append((rows[mask], slot, rows[mask], pa.array([code] * int(mask.sum()), pa.string())))
    if cfg.diversify_triggers:
        codes = t.column("trigger_codes").combine_chunks()
        flat = pc.list_flatten(codes)
        if len(flat):
            parent = pc.list_parent_indices(codes).to_numpy()
            uniq = pc.unique(flat)
            kinds = set(cfg.trigger_kinds)
            wanted = pa.array([c.split(":")[0] in kinds for c in uniq.to_pylist()])
            keep = _np(pc.take(wanted, pc.index_in(flat, value_set=uniq))).astype(bool) & notes[parent]
            sel = np.flatnonzero(keep)
            if len(sel):
                values = pc.binary_join_element_wise("trigger", pc.take(flat, pa.array(sel)), ":")
                pieces.append((parent[sel], 4, sel, values))
    flag_note = notes & flagged
    if flag_note.any():
        pieces.append((rows[flag_note], 5, rows[flag_note], pa.array(["memorized:probe"] * int(flag_note.sum()))))
    has_notes = np.zeros(n, bool)
    for r, slot, _, _ in pieces:
        if slot >= 3:
            has_notes[r] = True
    decisions = np.full(n, KEEP_CODE, dtype=np.int8)
    decisions[has_notes] = DIVERSIFY_CODE
    decisions[dropped] = DROP_CODE
    decisions[failed] = DROP_CODE if cfg.drop_failed else KEEP_CODE
    return decisions, _reason_lists(n, pieces)


def _reason_lists(n: int, pieces: list) -> pa.ListArray:
    if not pieces:
        return pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, np.int32)), EMPTY)
    row = np.concatenate([p[0] for p in pieces])
    slot = np.concatenate([np.full(len(p[0]), p[1]) for p in pieces])
    pos = np.concatenate([p[2] for p in pieces])
    values = pa.concat_arrays([p[3].combine_chunks() if isinstance(p[3], pa.ChunkedArray) else p[3] for p in pieces])
    order = np.lexsort((pos, slot, row))
    offsets = np.concatenate([[0], np.cumsum(np.bincount(row, minlength=n))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), values.take(pa.array(order)))


def manifest_table(t: pa.Table, decisions: np.ndarray, reasons: pa.ListArray) -> pa.Table:
    """``manifest_row`` for every row of an annotations table, as a table. ``decisions``: strings
    (``decide_columns``) or int codes (``decide_codes``)."""
    cid = pc.fill_null(t.column("cluster_id"), "")
    if decisions.dtype.kind in "iu":
        decision = pa.array(DECISIONS, pa.string()).take(pa.array(decisions))
    else:
        decision = pa.array(decisions, pa.string())
    columns = {
        "decision": decision,
        "reasons": reasons,
        "cluster_id": pc.if_else(pc.equal(cid, ""), t.column("key"), cid),
    }
    return pa.Table.from_arrays(
        [columns[f.name] if f.name in columns else t.column(f.name).cast(f.type) for f in arrow.MANIFEST],
        schema=arrow.MANIFEST,
    )
