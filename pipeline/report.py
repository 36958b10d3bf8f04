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
from collections import Counter

from pipeline.report_clusters import MAX_CLUSTERS, clusters, keeper_rule
from transforms.decide import DECISIONS, reason_family
from transforms.write import atomic_write_text, read_table

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
    tmp = f"{path}.tmp-{os.getpid()}.png"  # a new file, renamed: a hard-linked older figure stays as it was
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


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
    from pipeline.report_header import header, next_steps, output_links, trigger_rows

    manifest = _rows(out_dir, "manifest")
    config = info.get("config", {})
    found = clusters(manifest, out_dir, info.get("input", {}).get("shards", []), rdir, max_clusters)
    keywords = trigger_rows(_rows(out_dir, "triggers/keywords")[:20], found["table"])
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
        clusters=found["galleries"],
        n_clusters=found["n_clusters"],
        n_dropped_clusters=found["n_dropped_clusters"],
        cluster_table=found["table"],
        keeper=config.get("dedup", {}).get("keeper", "resolution"),
        keeper_rule=keeper_rule(config.get("dedup", {}).get("keeper", "resolution")),
        keywords=keywords,
        objects=_rows(out_dir, "triggers/objects")[:20],
        diversify=_diversify_examples(out_dir),
        failures=_failure_table(_rows(out_dir, "failures")),
        header=header(info),
        outputs=output_links(out_dir),
        next_steps=next_steps(out_dir, info),
    )


def script_json(value) -> str:
    """JSON to embed in a <script type="application/json">: no "<", ">" or "&" survives, so a
    caption holding ``</script>`` cannot end the block (the browser decodes the escapes)."""
    from markupsafe import Markup

    text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return Markup(text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


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
    env.filters["script_json"] = script_json
    html = env.get_template("report.html").render(**_page_context(out_dir, info, rdir, reuse_figures, max_clusters))
    path = os.path.join(rdir, "index.html")
    atomic_write_text(path, html)
    return path
