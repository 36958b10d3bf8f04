"""Output tables of the LAION-layout dedup job, built with column arrays (1M rows in seconds)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from schemas import arrow
from transforms import ann

EMBEDDER = "embedding"


def _metadata(meta_path: str | None, n: int, shard: str) -> dict[str, np.ndarray]:
    cols = {}
    if meta_path:
        t = pq.read_table(meta_path)
        for c in ("key", "url", "caption", "width", "height", "sha256"):
            if c in t.column_names:
                cols[c] = t.column(c).to_numpy(zero_copy_only=False)
    if "key" not in cols:
        cols["key"] = np.array([f"{shard}:{i:09d}" for i in range(n)], dtype=object)
    for c in ("url", "caption", "sha256"):
        cols.setdefault(c, np.full(n, "", dtype=object))
    for c in ("width", "height"):
        cols[c] = np.nan_to_num(np.asarray(cols.get(c, np.zeros(n)), dtype=np.float64)).astype(np.int64)
    return cols


def _keepers(labels: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Representative row per component label: highest score, ties -> the smallest row."""
    rows = np.arange(len(labels))
    order = np.lexsort((rows, -score, labels))
    first = np.ones(len(order), dtype=bool)
    first[1:] = labels[order][1:] != labels[order][:-1]
    rep = np.empty(labels.max() + 1 if len(labels) else 0, dtype=np.int64)
    rep[labels[order][first]] = order[first]
    return rep[labels]


def write_outputs(cfg, files, offsets, pairs_path: str, out_dir: str) -> dict:
    from pipeline.laion_job import _Vectors

    data = np.load(pairs_path)
    n = int(offsets[-1])
    labels = ann.components(n, data["a"], data["b"])
    sizes = np.bincount(labels, minlength=n)[labels]
    metas = [_metadata(m, int(offsets[i + 1] - offsets[i]), os.path.basename(f)[:-4]) for i, (f, m) in enumerate(files)]
    keys = np.concatenate([m["key"] for m in metas]).astype(object)
    area = np.concatenate([m["width"] * m["height"] for m in metas]).astype(np.float64)
    policy = cfg.dedup.keeper
    score = -np.arange(n, dtype=np.float64) if policy == "earliest" else area
    if policy.startswith("column:"):
        col = policy.split(":")[1]
        score = np.concatenate(
            [np.asarray(pq.read_table(m, columns=[col]).column(col).to_numpy(), dtype=np.float64) for _, m in files]
        )
        if policy.endswith(":asc"):
            score = -score
    rep = _keepers(labels, score)
    in_cluster = sizes > 1
    sim = np.ones(n, dtype=np.float32)
    members = np.flatnonzero(in_cluster & (rep != np.arange(n)))
    vec = _Vectors([f for f, _ in files], offsets[:-1])
    for s in range(0, len(members), 100_000):
        chunk = members[s : s + 100_000]
        sim[chunk] = np.einsum("ij,ij->i", vec.rows(chunk), vec.rows(rep[chunk]))
    is_rep = rep == np.arange(n)
    cluster_id = keys[labels]
    decision = np.where(is_rep, "keep", "drop").astype(object)
    all_urls = np.concatenate([m["url"] for m in metas])
    for table in ("manifest", "clusters", "neighbours", "blocklist"):
        os.makedirs(os.path.join(out_dir, table), exist_ok=True)
    for i, (f, _) in enumerate(files):
        a, b = int(offsets[i]), int(offsets[i + 1])
        shard, m = os.path.basename(f)[:-4], metas[i]
        sl = slice(a, b)
        reasons = [[f"duplicate:{EMBEDDER}"] if d == "drop" else [] for d in decision[sl]]
        cols = {
            "key": keys[sl],
            "shard": np.full(b - a, shard, dtype=object),
            "url": m["url"],
            "caption": m["caption"],
            "sha256": m["sha256"],
            "status": np.full(b - a, "ok", dtype=object),
            "decision": decision[sl],
            "reasons": reasons,
            "cluster_id": cluster_id[sl],
            "cluster_size": sizes[sl],
            "is_representative": is_rep[sl],
            "width": m["width"],
            "height": m["height"],
            "duplication": np.full(b - a, "", dtype=object),
            "trigger_codes": [[] for _ in range(b - a)],
            "probe_score": pa.nulls(b - a, pa.float64()),
        }
        _write(out_dir, "manifest", shard, cols, arrow.MANIFEST)
        sel = np.flatnonzero(in_cluster[sl]) + a
        _write(
            out_dir,
            "clusters",
            shard,
            {
                "key": keys[sel],
                "cluster_id": cluster_id[sel],
                "embedder": np.full(len(sel), EMBEDDER, dtype=object),
                "similarity": sim[sel].astype(np.float64),
                "cluster_size": sizes[sel],
                "is_representative": is_rep[sel],
            },
            arrow.CLUSTERS,
        )
        nn = data["nn"][sl]
        _write(
            out_dir,
            "neighbours",
            shard,
            {
                "key": keys[sl],
                "embedder": np.full(b - a, EMBEDDER, dtype=object),
                "nn_key": np.where(nn >= 0, keys[np.maximum(nn, 0)], None),
                "nn_similarity": data["nn_sim"][sl].astype(np.float64),
            },
            arrow.NEIGHBOURS,
        )
        drop = np.flatnonzero(decision[sl] == "drop") + a
        _write(
            out_dir,
            "blocklist",
            shard,
            {
                "url": np.concatenate([m["url"]])[drop - a],
                "sha256": m["sha256"][drop - a],
                "key": keys[drop],
                "reason": np.full(len(drop), f"duplicate:{EMBEDDER}", dtype=object),
                "category": np.full(len(drop), "duplicate", dtype=object),
                "kept_key": keys[rep[drop]],
                "kept_url": all_urls[rep[drop]],
            },
            arrow.BLOCKLIST,
        )
    from pipeline.blocklist import write_blocklist_txt

    write_blocklist_txt(out_dir)
    kept = int(is_rep.sum())
    return {
        "keys": n,
        "ok": n,
        "failed": 0,
        "decisions": {"drop": n - kept, "keep": kept},
        "failures_by_type": {},
        "forest_edges": int(len(data["a"])),
        "clusters": int(len(np.unique(labels[in_cluster]))),
    }


def _write(out_dir: str, table: str, shard: str, cols: dict, schema) -> None:
    arrays = [
        pa.array(cols[f.name], type=f.type) if not isinstance(cols[f.name], pa.Array) else cols[f.name] for f in schema
    ]
    t = pa.Table.from_arrays(arrays, schema=schema)
    path = os.path.join(out_dir, table, f"part-{shard}.parquet")
    tmp = f"{path}.tmp-{os.getpid()}"
    pq.write_table(t, tmp, compression="zstd")
    os.replace(tmp, path)
