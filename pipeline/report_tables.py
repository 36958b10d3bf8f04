"""The report's count tables: samples by reason family and decision (columnar over manifest
parts), and failures by type and stage (``pipeline/report.py`` draws the page from them)."""

from __future__ import annotations

from collections import Counter

from transforms.decide import DECISIONS, reason_family


def _reason_counts(table) -> tuple[Counter, Counter]:
    """A manifest part (decision, reasons) -> (Counter of (family, decision): samples with a
    reason of that family, Counter of decision: samples without a reason). Columnar: the
    decisions as dictionary codes, a (sample, family) pair counted once."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    reasons = table.column("reasons").combine_chunks()
    decision = pc.dictionary_encode(pc.fill_null(table.column("decision").cast(pa.string()), "None"))
    if isinstance(decision, pa.ChunkedArray):
        decision = decision.combine_chunks()
    d_code = decision.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    d_names = decision.dictionary.to_pylist()
    none = pc.fill_null(pc.list_value_length(reasons), 0).to_numpy(zero_copy_only=False) == 0
    alone = Counter({d_names[i]: int(n) for i, n in enumerate(np.bincount(d_code[none], minlength=len(d_names))) if n})
    flat = pc.list_flatten(reasons)
    by: Counter = Counter()
    if len(flat):
        uniq = pc.unique(flat)
        families = sorted({reason_family(r) for r in uniq.to_pylist()})
        fam_of = np.array([families.index(reason_family(r)) for r in uniq.to_pylist()], dtype=np.int64)
        fam = fam_of[pc.index_in(flat, value_set=uniq).to_numpy(zero_copy_only=False)]
        parent = pc.list_parent_indices(reasons).to_numpy(zero_copy_only=False).astype(np.int64)
        pair = np.sort(parent * len(families) + fam, kind="stable")  # sorted runs already: timsort is linear
        pair = pair[np.r_[True, pair[1:] != pair[:-1]]]  # a sample's family once
        codes = (pair % len(families)) * len(d_names) + d_code[pair // len(families)]
        pairs = np.bincount(codes, minlength=len(families) * len(d_names))
        by = Counter(
            {(families[i // len(d_names)], d_names[i % len(d_names)]): int(n) for i, n in enumerate(pairs) if n}
        )
    return by, alone


def _reason_table(manifest) -> list[dict]:
    """Reason families by decision: [{"reason", "keep", "diversify", "drop", "total"}], largest
    first. ``manifest``: rows (dicts), or manifest parts (Tables with decision and reasons)."""
    import pyarrow as pa

    if isinstance(manifest, list):
        manifest = (
            [
                pa.Table.from_pylist(
                    manifest, schema=pa.schema([("decision", pa.string()), ("reasons", pa.list_(pa.string()))])
                )
            ]
            if manifest
            else []
        )
    counts: Counter = Counter()
    no_reason: Counter = Counter()
    for part in manifest:
        by, alone = _reason_counts(part)
        counts.update(by)
        no_reason.update(alone)
    table: dict[str, Counter] = {}
    for (family, decision), n in counts.items():
        table.setdefault(family, Counter())[decision] += n
    rows = [dict(reason=f, total=sum(c.values()), **{d: c.get(d, 0) for d in DECISIONS}) for f, c in table.items()]
    if no_reason:
        rows.append(
            dict(
                reason="(no reason: kept as is)",
                total=sum(no_reason.values()),
                **{d: no_reason.get(d, 0) for d in DECISIONS},
            )
        )
    return sorted(rows, key=lambda r: (-r["total"], r["reason"]))


def _failure_table(failures) -> list[dict]:
    """Failures (rows, or failures parts as Tables) -> counts by (stage, error_type), with the
    first message of each as its example."""
    if not isinstance(failures, list):
        failures = _failure_groups(failures)
    by: dict[tuple[str, str], dict] = {}
    for f in failures:
        entry = by.setdefault(
            (f["stage"], f["error_type"]),
            {"stage": f["stage"], "error_type": f["error_type"], "n": 0, "example": (f["message"] or "")[:120]},
        )
        entry["n"] += f.get("n", 1)
    return sorted(by.values(), key=lambda f: (-f["n"], f["stage"], f["error_type"]))


def _failure_groups(parts) -> list[dict]:
    """Failures parts -> one row per part and (stage, error_type): its count and first message."""
    import pyarrow.compute as pc

    out = []
    first = pc.ScalarAggregateOptions(skip_nulls=False)
    for t in parts:
        if not t.num_rows:
            continue
        grouped = t.group_by(["stage", "error_type"], use_threads=False).aggregate(
            [("message", "first", first), ("stage", "count")]
        )
        for r in grouped.to_pylist():
            out.append(
                {
                    "stage": r["stage"],
                    "error_type": r["error_type"],
                    "message": r["message_first"],
                    "n": r["stage_count"],
                }
            )
    return out
