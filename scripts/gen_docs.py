"""Generate docs/config.md (every config field) and docs/outputs.md (every output column).

    python scripts/gen_docs.py            # rewrite both pages
    python scripts/gen_docs.py --check    # exit 1 when a page is out of date (tests/test_docs.py)

Fields come from the pydantic classes in pipeline/config.py (type, default, bounds); what each
does comes from the comment beside or above the field in that file, else from ``EFFECTS`` below.
A field with neither fails the generation: add a comment or an entry. Columns come from
schemas/arrow.py, described by the comment beside each column.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import sys
import tokenize
import typing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# what a field does, where pipeline/config.py has no comment for it (unit first when it has one)
EFFECTS = {
    "name": "the job's name: the report's title and run.json's `job`",
    "input": "what to read",
    "output": "where the tables, report and run.json go",
    "read": "limits and rules of the shard reader",
    "dedup": "duplicate finders and the keeper rule",
    "triggers": "memorization-trigger mining over captions and clusters",
    "probe": "the diffusion-model memorization probe",
    "decide": "the policy: keep, drop or diversify, with reason codes (`memsieve decide` re-tunes it)",
    "diversify": "alternative captions for diversified samples",
    "run": "runner, failure cap, seed and cache",
    "input.path": "what to read: a glob of webdataset .tar shards (local, gs://, s3://) or a folder in "
    "LAION's precomputed-embedding layout; `--input` overrides it",
    "input.format": "auto: decided from the path; webdataset or laion_embeddings to insist",
    "output.dir": "the output folder (`--output` overrides it)",
    "output.filtered_shards": "also write the kept samples as webdataset shards in filtered/",
    "output.report": "write report/index.html",
    "read.max_image_bytes": "bytes; a larger image member fails as image_too_large",
    "read.max_image_pixels": "pixels (width x height); a larger image fails as decompression_bomb",
    "read.max_caption_bytes": "bytes; a longer caption fails as caption_too_long",
    "read.require_caption": "a sample without a caption fails as missing_caption",
    "read.image_extensions": "member extensions read as the image",
    "dedup.phash.enabled": "near duplicates by perceptual hash (crops, resizes, re-encodes)",
    "dedup.clip.enabled": "semantic duplicates by open_clip image embeddings (needs pretrained weights)",
    "dedup.clip.batch_size": "images per forward pass",
    "dedup.clip.precision": "auto: fp16 on CUDA, fp32 on CPU",
    "dedup.exact": "same image bytes (sha256) are duplicates",
    "dedup.phash": "the perceptual-hash embedder",
    "dedup.clip": "the CLIP embedder",
    "dedup.cluster": "k-means cells for vector search (CLIP and LAION embeddings)",
    "triggers.enabled": "mine keyword -> cluster and keyword -> object triggers",
    "triggers.min_keyword_count": "captions; a keyword rarer than this is not tested",
    "triggers.min_pair_count": "captions; a keyword-cluster pair rarer than this is not tested",
    "triggers.min_p_cluster_given_keyword": "share of a keyword's captions that fall in the cluster",
    "triggers.min_p_keyword_given_cluster": "share of a cluster's captions that hold the keyword",
    "triggers.max_q_value": "Benjamini-Hochberg q value a trigger must beat",
    "triggers.bigrams": "also test two-word keywords",
    "triggers.near_duplicate_captions": "flag near-duplicate captions (MinHash) as trigger:near_duplicate_caption",
    "triggers.template_min_count": "captions sharing a template before it counts",
    "triggers.template_min_distinct": "distinct fillers a template needs",
    "triggers.object_source": "where object names come from: sample metadata (`objects`), CLIP, or none",
    "triggers.min_object_lift": "P(object | keyword) / P(object) a keyword -> object trigger needs",
    "triggers.min_p_object_given_keyword": "share of a keyword's samples that show the object",
    "probe.enabled": "score captions with the diffusion-model memorization probe",
    "probe.metric": "magnitude: first-step noise-prediction magnitude; anisotropy: its spread",
    "probe.seeds": "noise seeds averaged per caption (cost grows linearly)",
    "probe.batch_size": "captions per UNet forward",
    "probe.budget": "which captions to score: all, cluster representatives, trigger captions, or a sample",
    "probe.sample_fraction": "share of captions scored with budget: sample",
    "probe.reference_captions": "a file of captions known not to be memorized; calibrates the threshold",
    "probe.target_fpr": "false-positive rate on the reference captions that sets the threshold",
    "probe.device": "auto: cuda when available, else cpu",
    "decide.drop_failed": "drop samples that failed (false: keep them, off the blocklist)",
    "decide.drop_flagged_probe": "drop captions the probe flags (false: diversify them)",
    "decide.diversify_full_duplication": "diversify the kept member of a full-duplication cluster",
    "decide.diversify_triggers": "diversify captions with trigger codes of decide.trigger_kinds",
    "diversify.enabled": "write alternative captions for diversified samples",
    "diversify.strategies": "MC, RT, CWR, RC, RNA (Somepalli et al. 2023)",
    "diversify.n_alternatives": "alternative captions per sample",
    "run.runner": "the Beam runner (a `--runner` flag overrides it)",
    "run.max_failure_ratio": "share of samples; more failures fail the run (exit 1)",
    "run.seed": "seeds every random choice (k-means, budgets, diversification)",
}


def _comments(path: str) -> dict[tuple[str, str], str]:
    """(class name, field name) -> the comment beside the field, or the comment lines above it."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    out: dict[tuple[str, str], str] = {}
    lines = source.splitlines()
    current, pending = None, []
    inline = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and lines[tok.start[0] - 1][: tok.start[1]].strip():
            inline[tok.start[0]] = tok.string.lstrip("# ").strip()
    for number, line in enumerate(lines, start=1):
        m = re.match(r"class (\w+)\(", line)
        if m:
            current, pending = m.group(1), []
            continue
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("# ").strip())
            continue
        m = re.match(r"    (\w+): ", line)
        if current and m:
            text = inline.get(number) or " ".join(pending)
            if text:
                out[(current, m.group(1))] = text
        pending = []
    return out


def _type_name(annotation) -> str:
    text = repr(annotation) if not isinstance(annotation, type) else annotation.__name__
    text = text.replace("typing.", "").replace("NoneType", "None")
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    return text


def _bounds(field) -> str:
    parts = []
    for m in field.metadata:
        for name, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="), ("min_length", "len >=")):
            value = getattr(m, name, None)
            if value is not None:
                parts.append(f"{sym} {value}")
    return ", ".join(parts)


def config_rows():
    """(dotted field, type, default, bounds, effect) for every field, sections in order."""
    from pydantic import BaseModel

    from pipeline.config import JobConfig

    comments = _comments(os.path.join(ROOT, "pipeline", "config.py"))
    rows = []

    def walk(model, prefix: str):
        for name, field in model.model_fields.items():
            dotted = f"{prefix}{name}"
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                doc = " ".join((ann.__doc__ or "").split())
                rows.append((dotted, ann.__name__, "(section)", "", EFFECTS.get(dotted, doc)))
                walk(ann, dotted + ".")
                continue
            default = "(required)" if field.is_required() else repr(field.default)
            effect = EFFECTS.get(dotted) or comments.get((model.__name__, name), "")
            rows.append((dotted, _type_name(ann), default, _bounds(field), effect))

    walk(JobConfig, "")
    return rows


def config_page() -> str:
    rows = config_rows()
    missing = [r[0] for r in rows if not r[4].strip()]
    if missing:
        raise SystemExit(
            f"no description for {', '.join(missing)}: comment the field in pipeline/config.py or "
            "add it to EFFECTS in scripts/gen_docs.py"
        )
    out = [
        "# Job configuration reference",
        "",
        "Generated by `python scripts/gen_docs.py` from `pipeline/config.py`; `tests/test_docs.py` fails when",
        "a field has no line here. A job file is YAML; `--set section.field=value` overrides one field",
        "(the value is parsed as YAML). Unknown fields are errors that name the field (exit 2).",
        "",
        "| field | type | default | bounds | unit and effect |",
        "|---|---|---|---|---|",
    ]
    for dotted, kind, default, bounds, effect in rows:
        cells = [f"`{dotted}`", kind, default, bounds, effect]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out) + "\n"


# what a column means where schemas/arrow.py has no comment for it (the same name means the same
# thing in every table)
COLUMNS = {
    "key": "the sample's webdataset key (`__key__`)",
    "shard": "the input shard's name",
    "url": "the sample's source URL (img2dataset's url)",
    "caption": "the sample's caption (txt member, or the json's caption)",
    "sha256": "sha256 of the image bytes in the tar",
    "reasons": "reason codes (docs/reasons.md); a dropped sample carries only its drop reasons",
    "cluster_id": "the duplicate cluster (its smallest key); the key itself for a singleton",
    "cluster_size": "members of the cluster (1: not a duplicate)",
    "is_representative": "the member the cluster keeps",
    "width": "decoded width, pixels",
    "height": "decoded height, pixels",
    "trigger_codes": "trigger codes (docs/reasons.md)",
    "probe_score": "the memorization probe's score (null: not probed)",
    "probe_flagged": "the probe's own flag (score above its calibrated threshold)",
    "failure_stage": "stage that failed it: read, download, decode, embed, probe",
    "failure_type": "the failure type (docs/reasons.md)",
    "cluster_embedder": "strongest embedder linking it to its cluster: exact > pixels > phash > clip",
    "cluster_similarity": "similarity to the cluster's kept member (1.0 for it)",
    "stage": "read, download, decode, embed or probe",
    "error_type": "the failure type (docs/reasons.md)",
    "message": "what went wrong, for a person",
    "embedder": "exact, pixels, phash or clip",
    "similarity": "similarity to the cluster's kept member (phash: 1 - hamming/256; clip: cosine)",
    "nn_key": "its nearest other sample under this embedder",
    "nn_similarity": "similarity to it (re-threshold later without recomputing)",
    "keyword": "a caption word (or bigram)",
    "n_keyword": "captions holding the keyword",
    "n_cluster": "captions in the cluster",
    "n_both": "captions holding the keyword in the cluster (or showing the object)",
    "npmi": "normalised pointwise mutual information of keyword and cluster",
    "p_value": "one-sided Fisher exact test",
    "q_value": "Benjamini-Hochberg adjusted p value",
    "p_cluster_given_keyword": "share of the keyword's captions in the cluster",
    "p_keyword_given_cluster": "share of the cluster's captions with the keyword",
    "object": "an object name (metadata `objects` or CLIP zero-shot)",
    "lift": "P(object | keyword) / P(object)",
    "relation": "implicit_intended (the keyword names it) or unintended",
    "score": "the probe score",
    "metric": "magnitude or anisotropy",
    "model": "the probe model's name",
    "threshold": "the flag threshold (calibrated on reference captions, or probe.threshold)",
    "flagged": "score above the threshold",
    "alternatives": "alternative captions",
    "alternative_strategies": "the strategy of each alternative, in order",
    "strategy": "the strategies, comma-separated, in the alternatives' order",
    "gaussian_noise_sigma": "GN: text-embedding noise to apply at training time",
    "status": "ok or failed",
    "decision": "keep, drop or diversify",
    "duplication": "caption duplication of its cluster: empty, full or partial",
    "reason": "the drop reason codes, ';'-joined",
    "category": "duplicate, memorized, dead_link or unreadable",
    "kept_key": "duplicates: the key of the copy that was kept",
    "kept_url": "duplicates: its url",
    "original_width": "width before img2dataset resized (sidecar); 0: unknown",
    "original_height": "height before img2dataset resized (sidecar); 0: unknown",
    "path": "the shard's path",
    "members": "tar members",
    "keys": "distinct keys",
    "sidecar_rows": "rows of img2dataset's .parquet sidecar",
    "truncated": "the tar ends early",
    "events": "shard-level events (docs/reasons.md)",
    "meta_json": "the json member, re-serialised",
    "image": "image bytes",
    "image_ext": "image member extension",
}


def _column_comments() -> dict[tuple[str, str], str]:
    path = os.path.join(ROOT, "schemas", "arrow.py")
    out, current = {}, None
    with open(path, encoding="utf-8") as f:
        for line in f:
            m = re.match(r"^(\w+) = _schema\(", line)
            if m:
                current = m.group(1)
            m = re.search(r'pa\.field\("(\w+)".*#\s*(.+)$', line)
            if current and m:
                out[(current, m.group(1))] = m.group(2).strip()
    return out


def outputs_page() -> str:
    from schemas import arrow

    names = {id(v): k for k, v in vars(arrow).items() if k.isupper() and hasattr(v, "names")}
    comments = _column_comments()
    out = [
        "# Output tables",
        "",
        "Generated by `python scripts/gen_docs.py` from `schemas/arrow.py`. Every table is a folder of",
        "Parquet parts (`TABLE/part-<partition>.parquet`, rows sorted): per-sample tables by input shard,",
        "`clusters/` by a hash of the cluster id and `neighbours/` by embedder and a hash of the key (as many",
        "buckets as input shards). Each file carries `memsieve.schema` and `memsieve.schema_version` metadata.",
        "Read a table whole with DuckDB (`select * from 'OUT/manifest/*.parquet'`) or pyarrow",
        "(`pyarrow.dataset.dataset('OUT/manifest')`).",
        "",
    ]
    for table, schema in arrow.TABLES.items():
        const = names.get(id(schema), "")
        out += [f"## `{table}/`", "", "| column | type | nullable | meaning |", "|---|---|---|---|"]
        for field in schema:
            meaning = comments.get((const, field.name)) or COLUMNS.get(field.name, "")
            if not meaning:
                raise SystemExit(f"{table}.{field.name}: no meaning (comment it in schemas/arrow.py or add to COLUMNS)")
            meaning = meaning.replace("|", "\\|")
            out.append(f"| `{field.name}` | {field.type} | {'yes' if field.nullable else 'no'} | {meaning} |")
        out.append("")
    out += [
        "## Files",
        "",
        "| file | content |",
        "|---|---|",
        "| `blocklist.txt` | one URL a line: content drops only (categories duplicate, memorized) |",
        "| `blocklist.tsv` | every dropped sample: url, category, reason, key, sha256, kept_key, kept_url |",
        "| `blocklist.json` | the blocklist format: version, columns, categories, counts |",
        "| `run.json` | resolved config, versions, `stages` {seconds, items, ...}, counters, counts, checksums |",
        "| `report/index.html` | the report (opens from disk) |",
        "",
    ]
    return "\n".join(out)


PAGES = {"config.md": config_page, "outputs.md": outputs_page}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when a page differs from what would be written")
    args = ap.parse_args(argv)
    stale = []
    for name, make in PAGES.items():
        path = os.path.join(ROOT, "docs", name)
        text = make()
        current = open(path, encoding="utf-8").read() if os.path.isfile(path) else None
        if current != text:
            stale.append(name)
            if not args.check:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(text)
    if args.check and stale:
        print(f"out of date: {', '.join(stale)}; run python scripts/gen_docs.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
