"""The report's duplicate clusters: galleries of the largest, and every cluster in a searchable,
paginated table (thumbnails loaded lazily), with decoded and original sizes and the keeper rule.

Thumbnails are read back from the input shards by key (one pass over each shard that holds a
wanted key). The table is bounded (``MAX_TABLE``); past it the report says how many more the
``clusters/`` table holds.
"""

from __future__ import annotations

import os
import tarfile

from transforms.decide import DECISIONS

MAX_CLUSTERS = 8  # galleries shown (the largest clusters)
MAX_MEMBERS = 12  # thumbnails per gallery
MAX_TABLE = 20_000  # clusters listed in the searchable table
TABLE_THUMBS = 500  # clusters of the table that get thumbnails (kept + up to 3 dropped)
THUMB = (300, 224)


def keeper_rule(policy: str) -> str:
    """The keeper policy in words (``dedup.keeper``)."""
    if policy in ("resolution", "centre", ""):
        return (
            "the largest image: original size from the img2dataset sidecar when known, then decoded pixels, "
            "then the least compressed file; ties go to the smallest key"
        )
    if policy == "earliest":
        return "the smallest key (the earliest sample)"
    if policy.startswith("column:"):
        parts = policy.split(":")
        order = "lowest" if len(parts) > 2 and parts[2] == "asc" else "highest"
        return f"the {order} value of the sample metadata's {parts[1]!r} column; ties go to the smallest key"
    return policy


def thumbnails(wanted: dict[str, set[str]], shard_paths: list[str], rdir: str) -> dict[str, str]:
    """{shard name: keys} -> {key: relative thumbnail path}, read back from the shards."""
    from PIL import Image

    from transforms.decode import DecodeError, decode_image
    from transforms.read_shards import shard_name, split_member_name
    from transforms.write import safe_part_name

    os.makedirs(os.path.join(rdir, "thumbs"), exist_ok=True)
    out: dict[str, str] = {}
    for keys in wanted.values():  # thumbnails of an earlier report of this run (re-decide) are reused
        for key in keys:
            rel = f"thumbs/{safe_part_name(key)}.jpg"
            if os.path.isfile(os.path.join(rdir, rel)):
                out[key] = rel
    for path in shard_paths:
        keys = wanted.get(shard_name(path), set()) - set(out)
        if not keys or not os.path.isfile(path):
            continue
        try:
            with tarfile.open(path) as tar:
                for m in tar:
                    split = split_member_name(m.name) if m.isfile() else None
                    if not split or split[0] not in keys or split[0] in out:
                        continue
                    try:
                        img = decode_image(tar.extractfile(m).read(), split[1], 64_000_000)
                    except DecodeError:
                        continue
                    img.thumbnail(THUMB, Image.BICUBIC)
                    rel = f"thumbs/{safe_part_name(split[0])}.jpg"
                    tmp = os.path.join(rdir, f"{rel}.tmp-{os.getpid()}.jpg")
                    img.save(tmp, quality=85)
                    os.replace(tmp, os.path.join(rdir, rel))
                    out[split[0]] = rel
        except (tarfile.TarError, OSError, EOFError):
            continue  # a truncated shard: the thumbnails before the break are kept
    return out


def _sizes(out_dir: str, keys: set[str]) -> dict[str, tuple[int, int, int, int]]:
    """key -> (width, height, original_width, original_height) from the annotations table."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.report import part_tables

    out: dict[str, tuple[int, int, int, int]] = {}
    if not keys:
        return out
    wanted = ("key", "width", "height", "original_width", "original_height")
    value_set = pa.array(sorted(keys), pa.string())
    for t in part_tables(out_dir, "annotations", list(wanted)):
        for r in t.filter(pc.is_in(t.column("key"), value_set=value_set)).to_pylist():
            out[r["key"]] = tuple(int(r.get(c) or 0) for c in wanted[1:])
    return out


def size_text(size: tuple[int, int, int, int] | None) -> dict[str, str]:
    if not size:
        return {"decoded": "?", "original": "unknown"}
    w, h, ow, oh = size
    return {"decoded": f"{w}\u00d7{h}", "original": f"{ow}\u00d7{oh}" if ow and oh else "unknown"}


def _member(r: dict, thumbs: dict[str, str], sizes: dict) -> dict:
    return {
        "key": r["key"],
        "caption": r["caption"] or "",
        "url": r["url"] or "",
        "representative": bool(r["is_representative"]),
        "decision": r["decision"],
        "reasons": ", ".join(r["reasons"] or []),
        "thumb": thumbs.get(r["key"]),
        **size_text(sizes.get(r["key"])),
    }


def _ordered(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (not r["is_representative"], r["decision"] == "drop", r["key"]))


CLUSTER_COLUMNS = [
    "key",
    "shard",
    "caption",
    "url",
    "is_representative",
    "decision",
    "reasons",
    "cluster_id",
    "duplication",
]


def _clustered_mask(t):
    """A manifest part -> the mask of its rows of ok samples in duplicate clusters."""
    import pyarrow.compute as pc

    mask = pc.and_(pc.equal(t.column("status"), "ok"), pc.greater(pc.fill_null(t.column("cluster_size"), 1), 1))
    return pc.fill_null(mask, False)


def _clustered(t):
    """A manifest part -> its rows of ok samples in duplicate clusters."""
    return t.filter(_clustered_mask(t))


def cluster_sizes(out_dir: str) -> dict[str, tuple[int, bool]]:
    """cluster id -> (ok members in the manifest, any of them dropped): an aggregate per part."""
    import pyarrow.compute as pc

    from pipeline.report import part_tables

    out: dict[str, tuple[int, bool]] = {}
    for t in part_tables(out_dir, "manifest", ["cluster_id", "status", "cluster_size", "decision"]):
        t = _clustered(t)
        t = t.append_column("dropped", pc.equal(t.column("decision"), "drop"))
        agg = t.group_by("cluster_id").aggregate([("cluster_id", "count"), ("dropped", "any")])
        for cid, n, dropped in zip(
            *(agg.column(c).to_pylist() for c in ("cluster_id", "cluster_id_count", "dropped_any")), strict=True
        ):
            old_n, old_d = out.get(cid, (0, False))
            out[cid] = (old_n + n, old_d or bool(dropped))
    return out


KEYS_LISTED = 50  # member keys of a cluster in the table's search text


def _listed_rows(out_dir: str, ids: list[str], shown: set[str], thumbed: set[str] = frozenset()) -> dict[str, dict]:
    """The listed clusters' ok members in the manifest (rows in ``_ordered``'s order, sorted once
    as columns) -> {cluster id: {"rows": the first rows as dicts (``CLUSTER_COLUMNS``; the kept
    one, 4 for the ``thumbed`` clusters (the table's thumbnails), ``MAX_MEMBERS`` for the ``shown``
    ones), "size": members, "decisions": {decision: members}, "keys": the first ``KEYS_LISTED``
    members' keys, space-separated}}."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.report import part_tables

    groups = {cid: {"rows": [], "size": 0, "decisions": {}, "keys": ""} for cid in ids}
    if not ids:
        return groups
    wanted = pa.array(sorted(ids), pa.string())
    parts = []
    for t in part_tables(out_dir, "manifest", [*CLUSTER_COLUMNS, "status", "cluster_size"]):
        t = t.select(CLUSTER_COLUMNS).filter(_clustered_mask(t))
        parts.append(t.filter(pc.fill_null(pc.is_in(t.column("cluster_id"), value_set=wanted), False)))
    if not parts or not sum(p.num_rows for p in parts):
        return groups
    t = pa.concat_tables(parts)
    narrow = pa.table(
        {
            "cluster_id": t.column("cluster_id"),
            "_later": pc.invert(pc.fill_null(t.column("is_representative"), False)),
            "_dropped": pc.equal(t.column("decision"), "drop"),
            "key": t.column("key"),
        }
    )
    order = pc.sort_indices(narrow, [(c, "ascending") for c in narrow.column_names])  # the wide columns stay put
    cid_col = t.column("cluster_id").take(order).combine_chunks()
    starts = np.concatenate(
        [[0], np.flatnonzero(pc.not_equal(cid_col[1:], cid_col[:-1]).to_numpy(zero_copy_only=False)) + 1]
    )
    ends = np.append(starts[1:], len(cid_col))
    rank = np.arange(len(cid_col)) - np.repeat(starts, ends - starts)
    names = cid_col.take(pa.array(starts)).to_pylist()
    for cid, n in zip(names, (ends - starts).tolist(), strict=True):
        groups[cid]["size"] = n
    counts = t.group_by(["cluster_id", "decision"], use_threads=False).aggregate([("key", "count")])
    for cid, d, n in zip(*(counts.column(c).to_pylist() for c in ("cluster_id", "decision", "key_count")), strict=True):
        groups[cid]["decisions"][d] = n
    for g in groups.values():
        g["decisions"] = {d: g["decisions"][d] for d in DECISIONS if g["decisions"].get(d)}
    listed = rank < KEYS_LISTED
    keys = t.column("key").take(pa.array(order.to_numpy()[listed])).to_pylist()
    at = 0
    for cid, n in zip(names, np.minimum(ends - starts, KEYS_LISTED).tolist(), strict=True):
        groups[cid]["keys"] = " ".join(keys[at : at + n])
        at += n
    assert at == len(keys)
    head = rank < 1
    for wanted_ids, members in ((thumbed, 4), (shown, MAX_MEMBERS)):
        if wanted_ids:
            chosen = pc.is_in(cid_col, value_set=pa.array(sorted(wanted_ids), pa.string()))
            head |= (rank < members) & chosen.to_numpy(zero_copy_only=False)
    small = t.take(pa.array(order.to_numpy()[head]))
    columns = [small.column(c).to_pylist() for c in CLUSTER_COLUMNS]  # faster than to_pylist's dicts
    for values in zip(*columns, strict=True):
        r = dict(zip(CLUSTER_COLUMNS, values, strict=True))
        groups[r["cluster_id"]]["rows"].append(r)
    return groups


def clusters(out_dir: str, shard_paths: list[str], rdir: str, max_clusters: int) -> dict:
    """-> {"galleries": [...], "table": [...], "n_clusters": int, "n_dropped_clusters": int},
    from the manifest's cluster sizes (an aggregate) and the rows of the listed clusters only."""
    sizes = cluster_sizes(out_dir)
    ranked_ids = sorted(sizes, key=lambda cid: (-sizes[cid][0], cid))
    groups = _listed_rows(
        out_dir, ranked_ids[:MAX_TABLE], set(ranked_ids[:max_clusters]), set(ranked_ids[: min(TABLE_THUMBS, MAX_TABLE)])
    )
    listed = [(cid, groups[cid]["rows"]) for cid in ranked_ids[:MAX_TABLE]]
    shown = {cid: rows[:MAX_MEMBERS] for cid, rows in listed[:max_clusters]}
    wanted: dict[str, set[str]] = {}
    for rows in shown.values():
        for r in rows:
            wanted.setdefault(r["shard"], set()).add(r["key"])
    for _, rows in listed[:TABLE_THUMBS]:
        for r in rows[:4]:
            wanted.setdefault(r["shard"], set()).add(r["key"])
    thumbs = thumbnails(wanted, shard_paths, rdir)
    sizes_px = _sizes(out_dir, {k for keys in wanted.values() for k in keys} | {rows[0]["key"] for _, rows in listed})
    galleries = [
        {
            "id": cid,
            "size": groups[cid]["size"],
            "duplication": rows[0].get("duplication") or "",
            "decisions": groups[cid]["decisions"],
            "members": [_member(r, thumbs, sizes_px) for r in rows],
        }
        for cid, rows in shown.items()
    ]
    table = [_table_row(cid, groups[cid], thumbs, sizes_px) for cid, _ in listed]
    return {
        "galleries": galleries,
        "table": table,
        "n_clusters": len(sizes),
        "n_dropped_clusters": sum(dropped for _, dropped in sizes.values()),
    }


def _table_row(cid: str, group: dict, thumbs: dict, sizes: dict) -> dict:
    """One cluster of the table (``_listed_rows``' group: its first rows in ``_ordered``'s order)."""
    ordered = group["rows"]
    kept = ordered[0]
    return {
        "id": cid,
        "size": group["size"],
        "decisions": ", ".join(f"{n} {d}" for d, n in group["decisions"].items()),
        "kept": kept["key"] if kept["decision"] != "drop" else "",
        "kept_size": size_text(sizes.get(kept["key"])),
        "caption": (kept["caption"] or "")[:200],
        "keys": group["keys"],
        "thumbs": [
            {"src": thumbs[r["key"]], "key": r["key"], "decision": r["decision"]}
            for r in ordered[:4]
            if r["key"] in thumbs
        ],
    }
