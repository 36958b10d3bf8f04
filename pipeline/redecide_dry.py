"""``memsieve decide RUN_DIR --dry-run``: what a re-decide would change, counted by decision,
transition and reason family, one annotations part at a time and column by column; nothing is
written."""

from __future__ import annotations

import os
from collections import Counter

from pipeline.redecide import DECIDE_INPUTS, _load_run, _parts
from transforms.decide import reason_family


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

    from transforms.decide_columns import decide_columns

    t = pq.read_table(path, columns=["key", *DECIDE_INPUTS])
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
