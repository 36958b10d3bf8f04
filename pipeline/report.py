"""``report/index.html``: what a person reads after a run (Jinja2 page, matplotlib figures).

Counts by decision and reason, the largest duplicate clusters as galleries with the kept member
marked (thumbnails read back from the input shards by key), histograms of similarities and
probe scores with their thresholds, top keyword and object triggers, failures by type.
"""

from __future__ import annotations

import datetime as _dt
import os
import tarfile
from collections import Counter

from transforms.write import atomic_write_text, read_table

MAX_CLUSTERS = 8
MAX_MEMBERS = 12
THUMB = (300, 224)


def _rows(out_dir: str, table: str) -> list[dict]:
    t = read_table(os.path.join(out_dir, table))
    return t.to_pylist() if t is not None else []


def _figure(path: str, draw) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    draw(ax)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _similarity_figures(out_dir: str, rdir: str, config: dict, reuse: bool = False) -> list[dict]:
    figures = []
    neighbours = _rows(out_dir, "neighbours")
    by = {}
    for n in neighbours:
        by.setdefault(n["embedder"], []).append(n["nn_similarity"])
    thresholds = {}
    if config.get("dedup", {}).get("phash"):
        from transforms.phash import BITS, hamming_threshold

        thresholds["phash"] = 1 - hamming_threshold(config["dedup"]["phash"]["max_hamming"]) / BITS
    if config.get("dedup", {}).get("clip"):
        thresholds["clip"] = config["dedup"]["clip"]["threshold"]
    for embedder, values in sorted(by.items()):
        name = f"similarity_{embedder}.png"
        if reuse and os.path.isfile(os.path.join(rdir, name)):  # re-decide: similarities did not change
            figures.append({"path": name, "alt": f"{embedder} nearest-neighbour similarity histogram"})
            continue

        def draw(ax, values=values, embedder=embedder):
            ax.hist(values, bins=40, color="#4c72b0")
            if embedder in thresholds:
                ax.axvline(thresholds[embedder], color="#b3261e", linestyle="--", label="duplicate threshold")
                ax.legend()
            ax.set_xlabel(f"{embedder}: similarity to nearest neighbour")
            ax.set_ylabel("samples")

        _figure(os.path.join(rdir, name), draw)
        figures.append({"path": name, "alt": f"{embedder} nearest-neighbour similarity histogram"})
    scores = _rows(out_dir, "scores")
    if scores and reuse and os.path.isfile(os.path.join(rdir, "probe_scores.png")):
        figures.append({"path": "probe_scores.png", "alt": "probe score histogram"})
    elif scores:
        threshold = next((s["threshold"] for s in scores if s.get("threshold") is not None), None)

        def draw_scores(ax):
            ax.hist([s["score"] for s in scores], bins=40, color="#55a868")
            if threshold is not None:
                ax.axvline(threshold, color="#b3261e", linestyle="--", label="flag threshold")
                ax.legend()
            ax.set_xlabel(f"memorization probe score ({scores[0]['metric']})")
            ax.set_ylabel("captions")

        _figure(os.path.join(rdir, "probe_scores.png"), draw_scores)
        figures.append({"path": "probe_scores.png", "alt": "probe score histogram"})
    return figures


def _thumbnails(wanted: dict[str, set[str]], shard_paths: list[str], rdir: str) -> dict[str, str]:
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
                    img.save(os.path.join(rdir, rel), quality=85)
                    out[split[0]] = rel
        except (tarfile.TarError, OSError, EOFError):
            continue  # a truncated shard: the thumbnails before the break are kept
    return out


def _clusters(manifest: list[dict], shard_paths: list[str], rdir: str) -> tuple[list[dict], int]:
    groups: dict[str, list[dict]] = {}
    for r in manifest:
        if r["status"] == "ok" and (r["cluster_size"] or 1) > 1:
            groups.setdefault(r["cluster_id"], []).append(r)
    top = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:MAX_CLUSTERS]
    shown = {cid: sorted(rows, key=lambda r: (not r["is_representative"], r["key"]))[:MAX_MEMBERS] for cid, rows in top}
    wanted: dict[str, set[str]] = {}
    for rows in shown.values():
        for r in rows:
            wanted.setdefault(r["shard"], set()).add(r["key"])
    thumbs = _thumbnails(wanted, shard_paths, rdir)
    clusters = []
    for cid, rows in shown.items():
        clusters.append(
            {
                "id": cid,
                "size": len(groups[cid]),
                "duplication": rows[0].get("duplication") or "",
                "members": [
                    {
                        "key": r["key"],
                        "caption": (r["caption"] or "")[:80],
                        "kept": r["is_representative"],
                        "decision": r["decision"],
                        "thumb": thumbs.get(r["key"]),
                    }
                    for r in rows
                ],
            }
        )
    return clusters, len(groups)


def write_report(out_dir: str, info: dict, reuse_figures: bool = False) -> str:
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    rdir = os.path.join(out_dir, "report")
    os.makedirs(rdir, exist_ok=True)
    manifest = _rows(out_dir, "manifest")
    failures = _rows(out_dir, "failures")
    reasons = Counter(
        r.split(":")[0] + (":" + r.split(":")[1] if r.startswith(("duplicate", "failed")) else "")
        for row in manifest
        for r in row["reasons"]
    )
    fail_types: dict[tuple[str, str], dict] = {}
    for f in failures:
        entry = fail_types.setdefault(
            (f["stage"], f["error_type"]),
            {"stage": f["stage"], "error_type": f["error_type"], "n": 0, "example": (f["message"] or "")[:120]},
        )
        entry["n"] += 1
    clusters, n_clusters = _clusters(manifest, info.get("input", {}).get("shards", []), rdir)
    diversify = [
        {
            "key": r["key"],
            "caption": r["caption"],
            "pairs": list(zip(r.get("alternative_strategies") or [], r["alternatives"], strict=False)),
        }
        for r in _rows(out_dir, "diversify")[:10]
    ]
    env = Environment(
        loader=FileSystemLoader(os.path.join(os.path.dirname(__file__), "templates")),
        autoescape=select_autoescape(["html"]),
    )
    html = env.get_template("report.html").render(
        job=info.get("job", ""),
        summary=info["summary"],
        n_shards=info.get("input", {}).get("n_shards", 0),
        written=_dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        total_s=info.get("timings_s", {}).get("pipeline", ""),
        reasons=sorted(reasons.items(), key=lambda kv: -kv[1]),
        figures=_similarity_figures(out_dir, rdir, info.get("config", {}), reuse_figures),
        clusters=clusters,
        n_clusters=n_clusters,
        keywords=_rows(out_dir, "triggers/keywords")[:20],
        objects=_rows(out_dir, "triggers/objects")[:20],
        diversify=diversify,
        failures=sorted(fail_types.values(), key=lambda f: -f["n"]),
    )
    path = os.path.join(rdir, "index.html")
    atomic_write_text(path, html)
    return path
