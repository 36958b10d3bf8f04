"""``report/index.html``: what a person reads after a run (Jinja2 page, matplotlib figures).

Counts by decision and reason, the settings that made the decisions, the largest duplicate
clusters as galleries with the kept member marked (thumbnails read back from the input shards
by key), histograms of similarities and probe scores with their thresholds drawn, top keyword
and object triggers, caption-diversification examples, failures by type.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import hashlib
import json
import os

from pipeline.report_clusters import MAX_CLUSTERS, keeper_rule
from transforms.decide import DECISIONS
from transforms.write import atomic_write_text

THRESHOLD_COLOURS = ("#b3261e", "#6a3d9a")


def part_tables(out_dir: str, table: str, columns: list[str] | None = None):
    """A table's parts, one pyarrow Table at a time (only ``columns``), in ``read_table``'s order."""
    import pyarrow.parquet as pq

    from transforms import fsio

    folder = fsio.join(out_dir, table)
    if not fsio.isdir(folder):
        return
    for name in fsio.listdir(folder):
        if name.endswith(".parquet"):
            with fsio.open_input(fsio.join(folder, name)) as f:
                part = pq.ParquetFile(f)
                cols = [c for c in columns if c in part.schema_arrow.names] if columns else None
                yield part.read(columns=cols)


def head_rows(out_dir: str, table: str, n: int) -> list[dict]:
    """The first ``n`` rows of a table (``read_table(...)`` 's first rows, without reading the rest)."""
    out: list[dict] = []
    for t in part_tables(out_dir, table):
        out.extend(t.slice(0, n - len(out)).to_pylist())
        if len(out) >= n:
            break
    return out


def histograms(chunks, bins: int = 40) -> dict:
    """(group, values) numpy chunks -> {group: (counts, edges)}: ``np.histogram(values, bins)``
    of each group's values, from a first pass for the range and a second for the counts."""
    import numpy as np

    chunks = list(chunks)
    lo: dict = {}
    hi: dict = {}
    for g, v in chunks:
        if len(v):
            lo[g] = min(lo.get(g, np.inf), float(v.min()))
            hi[g] = max(hi.get(g, -np.inf), float(v.max()))
    out = {}
    for g, v in chunks:
        if g not in lo:
            continue
        counts, edges = np.histogram(v, bins=bins, range=(lo[g], hi[g]))
        if g in out:
            out[g] = (out[g][0] + counts, edges)
        else:
            out[g] = (counts, edges)
    return out


def _grouped_values(tables, group: str | None, value: str, where=None):
    """Parts -> (group value, numpy values) chunks (``where``: a part -> a row mask)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for t in tables:
        if where is not None:
            t = t.filter(where(t))
        t = t.filter(pc.is_valid(t.column(value)))
        if not t.num_rows:
            continue
        if group is None:
            yield None, t.column(value).to_numpy()
            continue
        for g in pc.unique(t.column(group)).to_pylist():
            yield g, t.filter(pc.equal(t.column(group), pa.scalar(g, pa.string()))).column(value).to_numpy()


def _histogram(path: str, values, xlabel: str, ylabel: str, lines: list[tuple[float, str]], colour: str) -> None:
    """A histogram (``(counts, edges)``: ``np.histogram``'s) with vertical threshold lines,
    written as a PNG (Agg backend, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.2), dpi=100)
    counts, edges = values
    ax.hist(edges[:-1], bins=edges, weights=counts, color=colour)
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
    """What to draw: name, histogram (counts, edges), labels and threshold lines, per histogram.
    Each table is read one part and one column at a time."""
    import pyarrow.compute as pc

    specs = []
    thresholds = _embedder_thresholds(config)
    by = histograms(
        _grouped_values(part_tables(out_dir, "neighbours", ["embedder", "nn_similarity"]), "embedder", "nn_similarity")
    )
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
    members = histograms(
        _grouped_values(
            part_tables(out_dir, "clusters", ["similarity", "is_representative"]),
            None,
            "similarity",
            lambda t: pc.invert(pc.fill_null(t.column("is_representative"), False)),
        )
    )
    if members:
        floor = decide_cfg.get("min_duplicate_similarity") or 0.0
        specs.append(
            dict(
                name="similarity_to_representative.png",
                values=members[None],
                lines=[(floor, "decide.min_duplicate_similarity")] if floor > 0 else [],
                xlabel="cluster members: similarity to the kept representative",
                ylabel="samples",
                alt="similarity of cluster members to their representative",
                colour="#8172b2",
            )
        )
    scores = list(part_tables(out_dir, "scores", ["score", "threshold", "metric"]))
    score_hist = histograms(_grouped_values(scores, None, "score"))
    if any(t.num_rows for t in scores):
        lines = []
        flag = next((v for t in scores for v in t.column("threshold").drop_null().to_pylist()), None)
        if flag is not None:
            lines.append((flag, "probe flag threshold"))
        if decide_cfg.get("probe_threshold") is not None:
            lines.append((decide_cfg["probe_threshold"], "decide.probe_threshold"))
        metric = next(t.column("metric")[0].as_py() for t in scores if t.num_rows)
        specs.append(
            dict(
                name="probe_scores.png",
                values=score_hist.get(None, ([0], [0.0, 1.0])),
                lines=lines,
                xlabel=f"memorization probe score ({metric})",
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
        drawn = {k: spec[k] for k in ("lines", "xlabel", "ylabel", "colour")}
        drawn["values"] = [list(map(float, spec["values"][0])), list(map(float, spec["values"][1]))]
        signatures[spec["name"]] = hashlib.sha256(json.dumps(drawn, sort_keys=True).encode()).hexdigest()
        if old.get(spec["name"]) != signatures[spec["name"]] or not os.path.isfile(path):
            _histogram(path, spec["values"], spec["xlabel"], spec["ylabel"], spec["lines"], spec["colour"])
        figures.append({"path": spec["name"], "alt": spec["alt"]})
    atomic_write_text(sig_path, json.dumps(signatures, indent=1, sort_keys=True))
    return figures


def _diversify_examples(out_dir: str, n: int = 10) -> list[dict]:
    return [
        {
            "key": r["key"],
            "caption": r["caption"],
            "pairs": list(zip(r.get("alternative_strategies") or [], r["alternatives"], strict=False)),
        }
        for r in head_rows(out_dir, "diversify", n)
    ]


def _page_context(out_dir: str, info: dict, rdir: str, reuse: bool, max_clusters: int) -> dict:
    from pipeline.report_header import header, next_steps, output_links
    from pipeline.report_stage import gathered_parts, table_parts  # the tables' part: maybe gathered in the run

    config = info.get("config", {})
    parts = gathered_parts(rdir) if max_clusters == MAX_CLUSTERS else None
    if parts is None:
        parts = table_parts(out_dir, info.get("input", {}).get("shards", []), config, rdir, reuse, max_clusters)
    found = parts["found"]
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
        reasons=parts["reasons"],
        figures=parts["figures"],
        clusters=found["galleries"],
        n_clusters=found["n_clusters"],
        n_dropped_clusters=found["n_dropped_clusters"],
        cluster_table=found["table"],
        keeper=config.get("dedup", {}).get("keeper", "resolution"),
        keeper_rule=keeper_rule(config.get("dedup", {}).get("keeper", "resolution")),
        keywords=parts["keywords"],
        objects=parts["objects"],
        diversify=_diversify_examples(out_dir),
        failures=parts["failures"],
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


@contextlib.contextmanager
def _gc_paused():
    """No cyclic garbage collection inside (the report allocates a bounded number of objects; the
    process that ran the pipeline may hold millions, which every full collection would walk)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


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
    with _gc_paused():  # bounded allocations; a collection here would walk the whole job's heap
        html = env.get_template("report.html").render(**_page_context(out_dir, info, rdir, reuse_figures, max_clusters))
    path = os.path.join(rdir, "index.html")
    atomic_write_text(path, html)
    return path
