"""The per-shard stage's columns: a shard's annotations, decisions and manifest as Arrow tables.

``annotation_table`` builds the ``annotations`` table of one shard from its joined records
(``transforms.shard_stage``) without an object per key: keys with a failure or a ``moved``
marker (rare) go through ``build_annotation``; every other key is its info row with the sparse
records (assignment, trigger codes, probe score, duplication class) joined by key index.
Decisions and the manifest over these columns: ``transforms.decide_columns``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas import arrow
from schemas.elements import Annotation, ClusterAssignment
from transforms.annotate import build_annotation

EMPTY = pa.array([], pa.string())


class Batch(list):
    """Values of one tag for one shard, gathered into one element (``BatchByShard``)."""


class Unbatched(dict):
    """A shard's joined records as ``unbatched`` returns them (spread once)."""


def unbatched(grouped: dict) -> dict:
    """A shard's joined records with every ``Batch`` spread back into its values."""
    if isinstance(grouped, Unbatched):
        return grouped
    out = Unbatched()
    for tag, values in grouped.items():
        values = list(values)
        if any(isinstance(v, Batch) for v in values):
            values = [x for v in values for x in (v if isinstance(v, Batch) else [v])]
        out[tag] = values
    return out


class BatchByShard(beam.DoFn):
    """(shard, value) -> (shard, Batch of values): one element per shard and bundle (at most
    ``size`` values), so the per-shard join shuffles batches, not one element per key.
    ``route``: an element -> (shard, value), for elements keyed otherwise."""

    def __init__(self, size: int = 50_000, route=None):
        self.size, self.route = size, route

    def start_bundle(self):
        self.held: dict[str, Batch] = {}

    def process(self, kv):
        shard, value = self.route(kv) if self.route is not None else kv
        batch = self.held.setdefault(shard, Batch())
        batch.append(value)
        if len(batch) >= self.size:
            yield shard, self.held.pop(shard)

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindow
        from apache_beam.utils.windowed_value import WindowedValue

        held, self.held = self.held, {}
        for shard, batch in sorted(held.items()):
            yield WindowedValue((shard, batch), 0, [GlobalWindow()])


# the info columns the per-shard stage reads (``info_for_annotations``): the rest stay out of its join
ANNOTATE_INFO = ("key", "shard", "url", "caption", "sha256", "width", "height", "original_width", "original_height")


def info_for_annotations(table: pa.Table) -> pa.Table:
    """An info batch -> only ``ANNOTATE_INFO`` (fewer bytes through the per-shard join)."""
    return table.select([c for c in ANNOTATE_INFO if c in table.column_names])


def sample_infos(table: pa.Table) -> list:
    """An info batch, all of ``SampleInfo``'s columns or only ``ANNOTATE_INFO`` -> SampleInfo
    objects in row order (a column that is not there takes its empty value)."""
    from schemas.elements import SampleInfo

    empty = {"pixel_sha256": ""}
    return [SampleInfo(**{**empty, **r}) for r in table.to_pylist()]


def by_key(pairs: Iterable[tuple]) -> dict[str, list]:
    out: dict[str, list] = {}
    for key, value in pairs:
        out.setdefault(key, []).append(value)
    return out


def first_per_key(tables: list) -> pa.Table | None:
    """A shard's info tables -> one table, a key repeated in the shard keeping its first record."""
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return None
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    if _sorted(table.column("key")) or pc.count_distinct(table.column("key")).as_py() == table.num_rows:
        return table
    keys = table.column("key").to_pylist()
    seen: set[str] = set()
    first = [i for i, k in enumerate(keys) if not (k in seen or seen.add(k))]
    return table.take(first)


def assignment_tuples(values: Iterable) -> Iterator[tuple]:
    """``ClusterAssignment`` elements, lists of them as tuples, or tables of their columns ->
    tuples (its fields' order)."""
    fields = tuple(ClusterAssignment.__dataclass_fields__)
    for v in values:
        if isinstance(v, pa.Table):
            yield from zip(*(v.column(c).to_pylist() for c in fields), strict=True)
        elif isinstance(v, ClusterAssignment):
            yield (v.key, v.cluster_id, v.cluster_size, v.is_representative, v.embedder, v.similarity, v.shard)
        else:
            yield from v


def is_in(keys, wanted) -> np.ndarray:
    if not len(wanted):
        return np.zeros(len(keys), bool)
    values = pa.array(sorted(wanted), pa.string())
    return pc.fill_null(pc.is_in(keys, value_set=values), False).to_numpy(zero_copy_only=False)


def _lookup(keys, index_keys) -> np.ndarray:
    """Position of each key in ``index_keys`` (distinct strings, a list or an Arrow array; -1: absent)."""
    if not len(index_keys):
        return np.full(len(keys), -1, np.int64)
    if not isinstance(index_keys, pa.Array):
        index_keys = pa.array(index_keys, pa.string())
    pos = pc.index_in(keys, value_set=index_keys)
    return pc.fill_null(pos, -1).to_numpy(zero_copy_only=False).astype(np.int64)


def _rows_of(values, keys) -> np.ndarray:
    """``_lookup(values, keys)`` (``keys`` distinct) with the hash table built on ``values``' distinct
    strings rather than on ``keys`` (when ``values`` are the fewer, as the sparse records are)."""
    encoded = pc.dictionary_encode(values)
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks()
    at = _lookup(keys, encoded.dictionary)  # each key -> its position among the distinct values
    row = np.full(len(encoded.dictionary), -1, dtype=np.int64)
    row[at[at >= 0]] = np.flatnonzero(at >= 0)
    return row[encoded.indices.to_numpy(zero_copy_only=False)] if len(values) else np.zeros(0, np.int64)


def assignment_table(values: Iterable) -> pa.Table:
    """``ClusterAssignment`` elements, lists of them as tuples, or tables of their columns -> one
    table of ``ASSIGNMENT_SCHEMA`` (the first row of each key kept), in arrival order."""
    from transforms.assignment_tables import ASSIGNMENT_FIELDS, ASSIGNMENT_SCHEMA

    parts, held = [], []

    def flush():
        if held:
            cols = list(zip(*held, strict=True))
            parts.append(
                pa.Table.from_arrays(
                    [pa.array(c, f.type) for c, f in zip(cols, ASSIGNMENT_SCHEMA, strict=True)],
                    schema=ASSIGNMENT_SCHEMA,
                )
            )
            held.clear()

    for v in values:
        if isinstance(v, pa.Table):
            flush()
            parts.append(v.select(list(ASSIGNMENT_FIELDS)).cast(ASSIGNMENT_SCHEMA))
        else:
            held.extend(assignment_tuples([v]))
    flush()
    if not parts:
        return ASSIGNMENT_SCHEMA.empty_table()
    table = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
    return table.filter(pa.array(_first_rows(table.column("key"))))


def _first_rows(keys) -> np.ndarray:
    """A string column -> a mask of each value's first row."""
    import pandas as pd

    if pc.count_distinct(keys).as_py() == len(keys):
        return np.ones(len(keys), bool)
    return ~pd.Series(keys.to_numpy(zero_copy_only=False)).duplicated(keep="first").to_numpy()


def _taken(column, pos: np.ndarray, default) -> pa.Array:
    """Row i -> ``column[pos[i]]``, ``default`` where pos is -1."""
    has = pos >= 0
    if not has.any():
        return pa.repeat(pa.scalar(default, column.type), len(pos))
    taken = pc.take(column, pa.array(np.where(has, pos, 0)))
    if isinstance(taken, pa.ChunkedArray):
        taken = taken.combine_chunks()
    return pc.if_else(pa.array(has), taken, pa.scalar(default, column.type))


def _duplication(keys: pa.Array, cluster_id: pa.Array, clustered: np.ndarray, pairs: list) -> pa.Array:
    """Each row's duplication class: of (its key, its cluster id) in ``pairs`` ((key, (cluster id,
    class)), the last pair winning), for ``clustered`` rows; "" elsewhere."""
    sel = np.flatnonzero(clustered)
    if not pairs or not len(sel):
        return _constant("", len(keys))
    pair_keys = pa.array([k for k, _ in pairs], pa.string())
    pair_cids = pa.array([v[0] for _, v in pairs], pa.string())
    classes = pa.array([v[1] for _, v in pairs], pa.string())
    if pair_keys.null_count or pair_cids.null_count or pc.count_distinct(pair_keys).as_py() != len(pair_keys):
        return _duplication_merge(keys, cluster_id, sel, pairs)
    # each key once (the usual case): a row's pair is its key's, if the cluster ids agree
    where = pa.array(sel)
    pos = _lookup(keys.take(where), pair_keys)
    found = pos >= 0
    at = pa.array(np.where(found, pos, 0))
    agree = pc.equal(pair_cids.take(at), pc.take(cluster_id, where)).to_numpy(zero_copy_only=False)
    hit = found & agree
    got = np.full(len(keys), -1, dtype=np.int64)
    got[sel[hit]] = pos[hit]
    return pc.fill_null(classes.take(pa.array(got, mask=got < 0)), "")


def _duplication_merge(keys: pa.Array, cluster_id: pa.Array, sel: np.ndarray, pairs: list) -> pa.Array:
    """``_duplication`` by a pandas merge on (key, cluster id) (repeated keys, null ids)."""
    import pandas as pd

    out = np.full(len(keys), "", dtype=object)
    right = pd.DataFrame(
        {"k": [k for k, _ in pairs], "c": [v[0] for _, v in pairs], "cls": [v[1] for _, v in pairs]}
    ).drop_duplicates(["k", "c"], keep="last")
    left = pd.DataFrame(
        {
            "k": keys.take(pa.array(sel)).to_numpy(zero_copy_only=False),
            "c": pc.take(cluster_id, pa.array(sel)).to_numpy(zero_copy_only=False),
        }
    )
    got = left.merge(right, on=["k", "c"], how="left", sort=False)["cls"]
    out[sel] = got.where(got.notna(), "").to_numpy(dtype=object)
    return pa.array(out, pa.string())


def _codes_column(keys: pa.Array, pairs: list) -> pa.Array:
    """Row i -> the sorted union of the codes of its key in ``pairs`` ((key, codes)), as list<string>.
    The codes are ranked as strings once (a few distinct ones); each row's union is a sort of
    (row, rank) integers."""
    n = len(keys)
    lengths = np.fromiter(map(len, (values for _, values in pairs)), dtype=np.int64, count=len(pairs))
    if not lengths.sum():
        return pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, np.int32)), EMPTY)
    codes = pc.dictionary_encode(pa.array([c for _, values in pairs for c in values], pa.string()))
    names = codes.dictionary
    order = pc.array_sort_indices(names).to_numpy()
    rank = np.empty(len(names), dtype=np.int64)
    rank[order] = np.arange(len(names))
    row = np.repeat(_rows_of(pa.array([k for k, _ in pairs], pa.string()), keys), lengths)
    found = row >= 0
    width = max(1, len(names))
    pair = np.sort(row[found] * width + rank[codes.indices.to_numpy(zero_copy_only=False)[found]])
    pair = pair[np.r_[True, pair[1:] != pair[:-1]]] if len(pair) else pair  # each code once per row
    offsets = np.concatenate([[0], np.cumsum(np.bincount(pair // width, minlength=n))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), names.take(pa.array(order[pair % width])))


def _fast_table(rows: pa.Table, grouped: dict) -> pa.Table:
    """Info rows of keys without a failure or ``moved`` marker -> their annotations columns."""
    n, keys = rows.num_rows, rows.column("key").combine_chunks()
    assigned = assignment_table(grouped.get("assignment", ()))
    a_pos = _lookup(keys, assigned.column("key").combine_chunks())
    size_col = _taken(assigned.column("cluster_size"), a_pos, 1)
    cluster_id = _taken(assigned.column("cluster_id"), a_pos, "")
    clustered = (a_pos >= 0) & (size_col.to_numpy(zero_copy_only=False) > 1)
    duplication = _duplication(keys, cluster_id, clustered, list(grouped.get("duplication", ())))
    trigger_codes = _codes_column(keys, list(grouped.get("codes", ())))
    scores: dict[str, dict] = {}
    for r in grouped.get("score", ()):
        scores.setdefault(r["key"], r)
    s_keys = list(scores)
    s_pos = _lookup(keys, s_keys)
    s_has = s_pos >= 0
    probe_score = pa.array(
        [float(scores[s_keys[p]]["score"]) if p >= 0 else None for p in s_pos.tolist()] if s_keys else [None] * n,
        pa.float64(),
    )
    flagged = np.zeros(n, bool)
    for i in np.flatnonzero(s_has).tolist():
        flagged[i] = bool(scores[s_keys[s_pos[i]]].get("flagged"))
    zero = {"width", "height", "original_width", "original_height"}
    columns = {
        "status": _constant("ok", n),
        "failure_stage": _constant("", n),
        "failure_type": _constant("", n),
        "cluster_id": cluster_id,
        "cluster_size": size_col,
        "is_representative": _taken(assigned.column("is_representative"), a_pos, True),
        "cluster_embedder": _taken(assigned.column("embedder"), a_pos, ""),
        "cluster_similarity": _taken(assigned.column("similarity"), a_pos, 1.0),
        "duplication": duplication,
        "trigger_codes": trigger_codes,
        "probe_score": probe_score,
        "probe_flagged": pa.array(flagged),
    }
    out = []
    for f in arrow.ANNOTATIONS:
        if f.name in columns:
            out.append(columns[f.name])
        elif f.name in zero:
            out.append(pc.fill_null(rows.column(f.name), 0).cast(f.type))
        else:
            out.append(rows.column(f.name).cast(f.type))
    return pa.Table.from_arrays(out, schema=arrow.ANNOTATIONS)


def _constant(value: str, n: int) -> pa.Array:
    return pa.repeat(pa.scalar(value, pa.string()), n)


def annotation_rows_table(rows: list[Annotation]) -> pa.Table:
    """Annotations -> the annotations table, column by column."""
    schema = arrow.ANNOTATIONS
    columns = []
    for field in schema:
        values = [getattr(a, field.name) for a in rows]
        if field.name == "trigger_codes":
            values = [list(v) for v in values]
        columns.append(pa.array(values, field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def joined_annotations(keys, sparse: dict, infos: dict, failures: dict) -> list[Annotation]:
    """``build_annotation`` of each key (in the given order) on its info, failures and sparse
    records (``sparse``: record name -> {key: [records]})."""
    out = []
    for key in keys:
        joined = {name: values.get(key, ()) for name, values in sparse.items()}
        joined["info"] = [infos[key]] if key in infos else []
        joined["failure"] = failures.get(key, [])
        a = build_annotation(key, joined)
        if a is not None:
            out.append(a)
    return out


def annotation_table(grouped: dict) -> pa.Table:
    """Pure: one shard's joined records (``transforms.shard_stage.shard_annotations``' ``grouped``)
    -> the annotations table of every key, sorted by key."""
    grouped = unbatched(grouped)
    moved = set(grouped.get("moved", ()))
    failures = by_key((f.key, f) for f in (*grouped.get("failure", ()), *grouped.get("late_failure", ())))
    slow = set(failures) | moved
    table = first_per_key(list(grouped.get("info", ())))
    parts, infos = [], {}
    if table is not None:
        is_slow = is_in(table.column("key"), slow)
        if is_slow.any():  # rare: most shards have neither failures nor moved keys
            parts.append(_fast_table(table.filter(pa.array(~is_slow)), grouped))
            infos = {i.key: i for i in sample_infos(table.filter(pa.array(is_slow)))}
        else:
            parts.append(_fast_table(table, grouped))
    rare = sorted((infos.keys() | failures.keys()) - moved)
    if rare:
        wanted = set(rare)
        assigned = assignment_table(grouped.get("assignment", ()))
        assigned = assigned.filter(pa.array(is_in(assigned.column("key"), wanted)))
        sparse = {
            "assignment": by_key((t[0], ClusterAssignment(*t)) for t in assignment_tuples([assigned])),
            "codes": by_key(kv for kv in grouped.get("codes", ()) if kv[0] in wanted),
            "score": by_key((r["key"], r) for r in grouped.get("score", ()) if r["key"] in wanted),
            "duplication": by_key(kv for kv in grouped.get("duplication", ()) if kv[0] in wanted),
        }
        parts.append(annotation_rows_table(joined_annotations(rare, sparse, infos, failures)))
    if not parts:
        return arrow.ANNOTATIONS.empty_table()
    out = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
    return out.sort_by("key") if len(parts) > 1 or not _sorted(out.column("key")) else out


def _sorted(keys) -> bool:
    """Whether a string column's values increase strictly (compared by Arrow, no object per value)."""
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    if len(keys) < 2:
        return True
    return pc.all(pc.fill_null(pc.greater(keys[1:], keys[:-1]), False)).as_py() is not False
