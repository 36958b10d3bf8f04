"""``report/index.html``: what a person reads after a run (Jinja2 page, matplotlib figures).

Counts by decision and reason, the settings that made the decisions, the largest duplicate
clusters as galleries with the kept member marked (thumbnails read back from the input shards
by key), histograms of similarities and probe scores with their thresholds drawn, top keyword
and object triggers, caption-diversification examples, failures by type.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import tarfile
from collections import Counter

from transforms.decide import DECISIONS, reason_family
from transforms.write import atomic_write_text, read_table

MAX_CLUSTERS = 8  # galleries shown (the largest clusters)
MAX_MEMBERS = 12  # thumbnails per gallery
THUMB = (300, 224)
THRESHOLD_COLOURS = ("#b3261e", "#6a3d9a")


def _rows(out_dir: str, table: str) -> list[dict]:
    t = read_table(os.path.join(out_dir, table))
    return t.to_pylist() if t is not None else []


def _histogram(path: str, values, xlabel: str, ylabel: str, lines: list[tuple[float, str]], colour: str) -> None:
    """A histogram with vertical threshold lines, written as a PNG (Agg backend, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.2), dpi=100)
    ax.hist(values, bins=40, color=colour)
    for (x, label), c in zip(lines, THRESHOLD_COLOURS, strict=False):
        ax.axvline(x, color=c, linestyle="--", label=f"{label} = {x:.3g}")
    if lines:
        ax.legend(fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _embedder_thresholds(config: dict) -> dict[str, float]:
    dedup = config.get("dedup", {})
    out = {}
    if dedup.get("phash", {}).get("enabled"):
        from transforms.phash import BITS, hamming_threshold

        out["phash"] = 1 - hamming_threshold(dedup["phash"]["max_hamming"]) / BITS
    if dedup.get("clip", {}).get("enabled"):
        out["clip"] = dedup["clip"]["threshold"]
    return out


def _figure_specs(out_dir: str, config: dict) -> list[dict]:
    """What to draw: name, values, labels and threshold lines, per histogram."""
    specs = []
    thresholds = _embedder_thresholds(config)
    by: dict[str, list[float]] = {}
    for n in _rows(out_dir, "neighbours"):
        by.setdefault(n["embedder"], []).append(n["nn_similarity"])
    for embedder, values in sorted(by.items()):
        lines = [(thresholds[embedder], "duplicate threshold")] if embedder in thresholds else []
        specs.append(
            dict(
                name=f"similarity_{embedder}.png",
                values=values,
                lines=lines,
                xlabel=f"{embedder}: similarity to nearest neighbour",
                ylabel="samples",
                alt=f"{embedder} nearest-neighbour similarity histogram",
                colour="#4c72b0",
            )
        )
    decide_cfg = config.get("decide", {})
    members = [r["similarity"] for r in _rows(out_dir, "clusters") if not r.get("is_representative", False)]
    if members:
        floor = decide_cfg.get("min_duplicate_similarity") or 0.0
        specs.append(
            dict(
                name="similarity_to_representative.png",
                values=members,
                lines=[(floor, "decide.min_duplicate_similarity")] if floor > 0 else [],
                xlabel="cluster members: similarity to the kept representative",
                ylabel="samples",
                alt="similarity of cluster members to their representative",
                colour="#8172b2",
            )
        )
    scores = _rows(out_dir, "scores")
    if scores:
        lines = []
        flag = next((s["threshold"] for s in scores if s.get("threshold") is not None), None)
        if flag is not None:
            lines.append((flag, "probe flag threshold"))
        if decide_cfg.get("probe_threshold") is not None:
            lines.append((decide_cfg["probe_threshold"], "decide.probe_threshold"))
        specs.append(
            dict(
                name="probe_scores.png",
                values=[s["score"] for s in scores],
                lines=lines,
                xlabel=f"memorization probe score ({scores[0]['metric']})",
                ylabel="captions",
                alt="probe score histogram",
                colour="#55a868",
            )
        )
    return specs


def _figures(out_dir: str, rdir: str, config: dict, reuse: bool) -> list[dict]:
    """Draw the histograms. A re-decide (``reuse``) redraws only those whose data or threshold
    lines changed (a signature per figure in ``figures.json``): matplotlib costs it nothing else."""
    sig_path = os.path.join(rdir, "figures.json")
    old = {}
    if reuse and os.path.isfile(sig_path):
        with open(sig_path, encoding="utf-8") as f:
            old = json.load(f)
    figures, signatures = [], {}
    for spec in _figure_specs(out_dir, config):
        path = os.path.join(rdir, spec["name"])
        drawn = {k: spec[k] for k in ("values", "lines", "xlabel", "ylabel", "colour")}
        signatures[spec["name"]] = hashlib.sha256(json.dumps(drawn, sort_keys=True).encode()).hexdigest()
        if old.get(spec["name"]) != signatures[spec["name"]] or not os.path.isfile(path):
            _histogram(path, spec["values"], spec["xlabel"], spec["ylabel"], spec["lines"], spec["colour"])
        figures.append({"path": spec["name"], "alt": spec["alt"]})
    atomic_write_text(sig_path, json.dumps(signatures, indent=1, sort_keys=True))
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


def _member(r: dict, thumbs: dict[str, str]) -> dict:
    return {
        "key": r["key"],
        "caption": r["caption"] or "",
        "representative": bool(r["is_representative"]),
        "decision": r["decision"],
        "reasons": ", ".join(r["reasons"] or []),
        "thumb": thumbs.get(r["key"]),
    }


def _clusters(manifest: list[dict], shard_paths: list[str], rdir: str, max_clusters: int) -> tuple[list[dict], int]:
    groups: dict[str, list[dict]] = {}
    for r in manifest:
        if r["status"] == "ok" and (r["cluster_size"] or 1) > 1:
            groups.setdefault(r["cluster_id"], []).append(r)
    top = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:max_clusters]
    shown = {cid: sorted(rows, key=lambda r: (not r["is_representative"], r["key"]))[:MAX_MEMBERS] for cid, rows in top}
    wanted: dict[str, set[str]] = {}
    for rows in shown.values():
        for r in rows:
            wanted.setdefault(r["shard"], set()).add(r["key"])
    thumbs = _thumbnails(wanted, shard_paths, rdir)
    clusters = [
        {
            "id": cid,
            "size": len(groups[cid]),
            "duplication": rows[0].get("duplication") or "",
            "decisions": {d: n for d in DECISIONS if (n := sum(r["decision"] == d for r in groups[cid]))},
            "members": [_member(r, thumbs) for r in rows],
        }
        for cid, rows in shown.items()
    ]
    return clusters, len(groups)


def _reason_table(manifest: list[dict]) -> list[dict]:
    """Reason families by decision: [{"reason", "keep", "diversify", "drop", "total"}], largest first."""
    table: dict[str, Counter] = {}
    for row in manifest:
        for family in sorted({reason_family(r) for r in row["reasons"] or []}):
            table.setdefault(family, Counter())[row["decision"]] += 1
    rows = [dict(reason=f, total=sum(c.values()), **{d: c.get(d, 0) for d in DECISIONS}) for f, c in table.items()]
    no_reason = Counter(row["decision"] for row in manifest if not row["reasons"])
    if no_reason:
        rows.append(
            dict(
                reason="(no reason: kept as is)",
                total=sum(no_reason.values()),
                **{d: no_reason.get(d, 0) for d in DECISIONS},
            )
        )
    return sorted(rows, key=lambda r: (-r["total"], r["reason"]))


def _failure_table(failures: list[dict]) -> list[dict]:
    by: dict[tuple[str, str], dict] = {}
    for f in failures:
        entry = by.setdefault(
            (f["stage"], f["error_type"]),
            {"stage": f["stage"], "error_type": f["error_type"], "n": 0, "example": (f["message"] or "")[:120]},
        )
        entry["n"] += 1
    return sorted(by.values(), key=lambda f: (-f["n"], f["stage"], f["error_type"]))


def _diversify_examples(out_dir: str, n: int = 10) -> list[dict]:
    return [
        {
            "key": r["key"],
            "caption": r["caption"],
            "pairs": list(zip(r.get("alternative_strategies") or [], r["alternatives"], strict=False)),
        }
        for r in _rows(out_dir, "diversify")[:n]
    ]


def _page_context(out_dir: str, info: dict, rdir: str, reuse: bool, max_clusters: int) -> dict:
    manifest = _rows(out_dir, "manifest")
    config = info.get("config", {})
    clusters, n_clusters = _clusters(manifest, info.get("input", {}).get("shards", []), rdir, max_clusters)
    return dict(
        job=info.get("job", ""),
        summary=info["summary"],
        decisions=[(d, info["summary"]["decisions"].get(d, 0)) for d in DECISIONS],
        n_shards=info.get("input", {}).get("n_shards", 0),
        written=_dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        total_s=info.get("timings_s", {}).get("pipeline", ""),
        redecided=info.get("redecided", []),
        settings=sorted(config.get("decide", {}).items()),
        diversify_cfg=config.get("diversify", {}),
        reasons=_reason_table(manifest),
        figures=_figures(out_dir, rdir, config, reuse),
        clusters=clusters,
        n_clusters=n_clusters,
        keywords=_rows(out_dir, "triggers/keywords")[:20],
        objects=_rows(out_dir, "triggers/objects")[:20],
        diversify=_diversify_examples(out_dir),
        failures=_failure_table(_rows(out_dir, "failures")),
    )


def write_report(
    out_dir: str, info: dict, reuse_figures: bool = False, max_clusters: int = MAX_CLUSTERS, report_dir: str = ""
) -> str:
    """Write ``OUT/report/index.html`` (and its PNGs and thumbnails); returns the page's path.

    ``info`` is the run.json content (summary, config, input shards, timings)."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    rdir = report_dir or os.path.join(out_dir, "report")  # report_dir: a local folder for remote outputs
    os.makedirs(rdir, exist_ok=True)
    env = Environment(
        loader=FileSystemLoader(os.path.join(os.path.dirname(__file__), "templates")),
        autoescape=select_autoescape(["html"]),
    )
    html = env.get_template("report.html").render(**_page_context(out_dir, info, rdir, reuse_figures, max_clusters))
    path = os.path.join(rdir, "index.html")
    atomic_write_text(path, html)
    return path
