"""The img2dataset ``.parquet`` sidecar of a shard: failed downloads, rows a damaged tar lost, and
the original image sizes img2dataset recorded before resizing (the keeper ranks by them).

Keys are matched by value as well as by text: img2dataset's tar keys are zero-padded
(``000000012``) while a sidecar written by other tools may hold the integer ``12``; both name
one sample, never two.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from schemas.elements import Failure

COLUMNS = ("key", "status", "url", "caption", "error_message", "original_width", "original_height")


TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def tar_stem(path: str) -> str:
    """``a/00000.tar`` (``.TAR``, ``.tar.gz``, ``.tgz``) -> ``a/00000``."""
    lower = path.lower()
    return next((path[: -len(s)] for s in TAR_SUFFIXES if lower.endswith(s)), path)


def sidecar_path(path: str) -> str:
    return tar_stem(path) + ".parquet"


def read_sidecar(parquet_path: str) -> list[dict]:
    """Rows of an img2dataset ``.parquet`` sidecar (the columns in ``COLUMNS`` it has)."""
    import pyarrow.parquet as pq

    from transforms import fsio

    with fsio.open_input(parquet_path) as f:
        table = pq.read_table(f)
    wanted = [c for c in COLUMNS if c in table.column_names]
    return table.select(wanted).to_pylist()


def read_sidecar_rows(path: str, events: list[str]) -> list[dict]:
    """The sidecar's rows, or [] when it is missing or unreadable (an event says which)."""
    from transforms import fsio

    side = sidecar_path(path)
    try:
        if not fsio.exists(side):
            return []
        return read_sidecar(side)
    except Exception as exc:  # a corrupt sidecar must not lose the tar's samples
        events.append(f"bad_sidecar:{type(exc).__name__}: {exc}"[:500])
        return []


def key_id(key) -> tuple:
    """A key's identity for matching a sidecar row to a tar key: digits compare by value."""
    text = str(key).strip()
    if isinstance(key, int) or (text.isdigit() and text.isascii()):
        return ("n", int(text))
    return ("s", text)


def _positive_int(value) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        return 0
    return number if 0 < number < 1 << 31 else 0


def original_size(meta: dict) -> tuple[int, int]:
    """(original_width, original_height) from a json member or a sidecar row; (0, 0) unknown."""
    w, h = _positive_int(meta.get("original_width")), _positive_int(meta.get("original_height"))
    return (w, h) if w and h else (0, 0)


def original_sizes(rows: Iterable[dict]) -> dict[tuple, tuple[int, int]]:
    """key_id -> original size, for the sidecar rows that record one."""
    out = {}
    for row in rows:
        size = original_size(row)
        if size[0] and row.get("key") is not None:
            out[key_id(row["key"])] = size
    return out


def _row_key(raw, width: int) -> str:
    """A sidecar key as the tar would spell it (integers zero-padded like the tar's keys)."""
    if isinstance(raw, int) and width:
        return f"{raw:0{width}d}"
    return str(raw if raw is not None else "").strip()


def sidecar_failures(shard: str, seen: set, truncated: str, rows: list[dict]) -> Iterator[Failure]:
    """A Failure for every sidecar row whose key the tar did not hold (failed downloads, rows
    lost to a damaged tar, rows the tar never had). ``seen`` (tar keys) grows with the rows."""
    ids = {key_id(k) for k in seen}
    widths = {len(k) for k in seen if k.isdigit()}
    width = max(widths) if len(widths) == 1 else 0
    for row in rows:
        raw = row.get("key")
        key = _row_key(raw, width)
        if not key or key_id(raw if isinstance(raw, int) else key) in ids:
            continue
        ids.add(key_id(raw if isinstance(raw, int) else key))
        seen.add(key)
        status = str(row.get("status") or "unknown")
        url, caption = str(row.get("url") or ""), str(row.get("caption") or "")
        if status != "success":
            msg = str(row.get("error_message") or status)
            yield Failure(key, shard, "download", status, msg[:500], url, caption)
        elif truncated:
            yield Failure(key, shard, "read", "truncated_tar", truncated, url, caption)
        else:
            msg = "listed as success in the parquet sidecar but absent from the tar"
            yield Failure(key, shard, "read", "missing_from_shard", msg, url, caption)
