"""Columns of a LAION-layout reader batch: the validity rules and the SampleInfo table, vectorised.

One metadata record batch (or none: rows past the metadata) and the batch's vector validity
give a reason code per row (``row_reasons``; the first failing rule in the reader's order
wins); the good rows become one ``schemas.arrow.INFO_BATCH`` table with pyarrow.compute and
numpy (``info_columns``, ``meta_json``); Python objects are built only for the failed rows.

Text follows the per-row rules it replaces: a missing value is "", a non-string is ``str()``'d,
keys and captions are stripped of what Python's ``str.strip`` strips, sizes are ``int(float)``
when finite and positive (else 0), and ``meta_json`` is the JSON object of every other column
with sorted keys, non-finite floats as null and bytes as hex.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

FIELDS = ("key", "url", "caption", "sha256", "width", "height", "original_width", "original_height")
SIZES = ("width", "height", "original_width", "original_height")

OK, NO_META, NO_VECTOR, STATUS, BAD_VECTOR, TOO_LONG, NO_CAPTION = range(7)


def _int(value) -> int:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return 0
    return int(f) if math.isfinite(f) and f > 0 else 0


def _text(value) -> str:
    return "" if value is None else str(value)


def _json_value(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, bytes):
        return value.hex()
    return value


def _plain(col: pa.Array) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return col.dictionary_decode() if pa.types.is_dictionary(col.type) else col


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def text_column(batch: pa.RecordBatch | None, name: str, n: int) -> pa.Array:
    """A column as strings: null -> "", other types ``str()``'d."""
    if batch is None or name not in batch.schema.names:
        return pa.nulls(n, pa.string()).fill_null("")
    col = _plain(batch.column(name))
    if _is_text(col.type):
        return col.cast(pa.string()).fill_null("")
    return pa.array([_text(v) for v in col.to_pylist()], pa.string())


def stripped(col: pa.Array) -> pa.Array:
    """``str.strip()``: Arrow's Unicode whitespace is Python's ``str.isspace`` set (tested)."""
    return pc.utf8_trim_whitespace(col)


def int_column(batch: pa.RecordBatch, name: str, n: int) -> np.ndarray:
    """Sizes: int(float(value)) when finite and positive, else 0."""
    if name not in batch.schema.names:
        return np.zeros(n, dtype=np.int64)
    col = _plain(batch.column(name))
    if pa.types.is_integer(col.type):
        x = col.cast(pa.int64(), safe=False).fill_null(0).to_numpy(zero_copy_only=False)
        return np.maximum(x, 0)
    if pa.types.is_floating(col.type):
        x = col.cast(pa.float64()).fill_null(0.0).to_numpy(zero_copy_only=False)
        ok = np.isfinite(x) & (x > 0) & (x < 2.0**63)
        return np.where(ok, np.trunc(np.where(ok, x, 0.0)), 0).astype(np.int64)
    return np.asarray([_int(v) for v in col.to_pylist()], dtype=np.int64)


def row_reasons(
    batch: pa.RecordBatch | None,
    n: int,
    good_vector: np.ndarray,
    caption: pa.Array,
    status: pa.Array,
    max_caption_bytes: int,
    require_caption: bool,
) -> np.ndarray:
    """A reason code per row (OK: a good row); ``good_vector`` covers the rows that have one."""
    reasons = np.zeros(n, dtype=np.int8)
    if batch is None:
        reasons[:] = NO_META
        return reasons
    if require_caption:
        reasons[pc.equal(pc.binary_length(caption), 0).to_numpy(zero_copy_only=False)] = NO_CAPTION
    too_long = pc.greater(pc.binary_length(caption), max_caption_bytes).to_numpy(zero_copy_only=False)
    reasons[too_long] = TOO_LONG
    has_vector = np.zeros(n, dtype=bool)
    has_vector[: len(good_vector)] = True
    good = np.zeros(n, dtype=bool)
    good[: len(good_vector)] = good_vector
    reasons[has_vector & ~good] = BAD_VECTOR
    bad_status = pc.and_(pc.not_equal(status, ""), pc.not_equal(status, "success"))
    reasons[bad_status.to_numpy(zero_copy_only=False)] = STATUS
    reasons[~has_vector] = NO_VECTOR
    return reasons


def _float_json(col: pa.Array) -> pa.Array:
    """Floats as Python's json writes them (a float stays a float: "1" -> "1.0"); NaN/inf null."""
    f = col.cast(pa.float64())
    s = f.cast(pa.string())
    whole = pc.invert(pc.match_substring_regex(s, "[.en]"))
    s = pc.if_else(whole, pc.binary_join_element_wise(s, ".0", ""), s)
    return pc.if_else(pc.is_finite(f), s, pa.scalar(None, pa.string()))


def _string_json(col: pa.Array) -> pa.Array:
    """Strings as quoted JSON strings (UTF-8 kept, as ``ensure_ascii=False``)."""
    col = col.cast(pa.string())
    s = pc.replace_substring(pc.replace_substring(col, "\\", "\\\\"), '"', '\\"')
    s = pc.binary_join_element_wise('"', s, '"', "")
    control = pc.match_substring_regex(col, "[\\x00-\\x1f]").fill_null(False)
    if pc.any(control).as_py():  # rare: json.dumps escapes control characters for these rows
        rows = np.flatnonzero(control.to_numpy(zero_copy_only=False))
        fixed = [json.dumps(v, ensure_ascii=False) for v in col.take(pa.array(rows)).to_pylist()]
        s = pc.replace_with_mask(s, control, pa.array(fixed, pa.string()))
    return s


def json_fragments(col: pa.Array) -> pa.Array:
    """Each value of a column as a JSON text ("null" for a missing one)."""
    col = _plain(col)
    t = col.type
    if pa.types.is_integer(t):
        s = col.cast(pa.string())
    elif pa.types.is_floating(t):
        s = _float_json(col)
    elif pa.types.is_boolean(t):
        s = pc.if_else(col, "true", "false")
    elif _is_text(t):
        s = _string_json(col)
    else:  # binary, nested, temporal, decimal ...: one Python value at a time
        values = [json.dumps(_json_value(v), sort_keys=True, default=str) for v in col.to_pylist()]
        return pa.array(values, pa.string())
    return s.fill_null("null")


def meta_json(batch: pa.RecordBatch, others: list[str]) -> pa.Array:
    """The JSON object of the ``others`` columns per row, keys sorted; "{}" when there are none."""
    if not others:
        return pa.nulls(batch.num_rows, pa.string()).fill_null("{}")
    parts: list = []
    for i, name in enumerate(sorted(others)):
        parts += [("{" if i == 0 else ", ") + json.dumps(name) + ": ", json_fragments(batch.column(name))]
    parts.append("}")
    return pc.binary_join_element_wise(*parts, "")


def info_columns(batch: pa.RecordBatch, shard: str, keys: pa.Array, caption: pa.Array, others: list[str]) -> dict:
    """The SampleInfo columns of a (good rows only) metadata batch."""
    n = batch.num_rows
    empty = pa.nulls(n, pa.string()).fill_null("")
    cols = {
        "key": keys,
        "shard": pa.nulls(n, pa.string()).fill_null(shard),
        "url": text_column(batch, "url", n),
        "caption": caption,
        "sha256": text_column(batch, "sha256", n),
        "pixel_sha256": empty,
        "meta_json": meta_json(batch, others),
        "image_bytes": pa.array(np.zeros(n, dtype=np.int64)),
        "notes": empty,
    }
    for name in SIZES:
        cols[name] = pa.array(int_column(batch, name, n))
    return cols
