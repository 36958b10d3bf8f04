"""The report's frame: what ran (input, job, models, versions), warnings a reader must see
before trusting the numbers, links to the output tables, and what to do next."""

from __future__ import annotations

import json
import os

LAB_CLASS = "MemsieveLab"  # models/memlab's model_index.json (scripts/train_lab.py)
TABLES = (
    ("manifest/", "every input key: decision and reason codes"),
    ("blocklist.txt", "URLs to publish: content drops (duplicates, memorized)"),
    ("blocklist.tsv", "every dropped sample with its category and the copy that was kept"),
    ("blocklist.json", "the blocklist's format (version, columns, categories, counts)"),
    ("diversify/", "kept samples with alternative captions"),
    ("clusters/", "duplicate clusters: member, embedder, similarity to the kept copy"),
    ("neighbours/", "nearest neighbour per sample and embedder (re-threshold later)"),
    ("scores/", "memorization probe scores"),
    ("triggers/keywords/", "keyword -> cluster triggers"),
    ("triggers/objects/", "keyword -> object triggers"),
    ("failures/", "samples that could not be processed"),
    ("annotations/", "everything known per key (memsieve decide reads it)"),
    ("shards/", "input shards: members, keys, events"),
    ("filtered/", "the kept samples as webdataset shards"),
    ("run.json", "resolved config, versions, per-stage timings and counters"),
)


def is_lab_model(model: str | None) -> bool:
    """The project's own toy diffusion model (models/memlab), not a production model."""
    if not model:
        return False
    index = os.path.join(model, "model_index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                return json.load(f).get("_class_name") == LAB_CLASS
        except (OSError, ValueError):
            return False
    return os.path.basename(model.rstrip("/")) == "memlab"


def header(info: dict) -> dict:
    config = info.get("config", {})
    versions = info.get("versions", {})
    probe, clip = config.get("probe", {}), config.get("dedup", {}).get("clip", {})
    models, warnings = [], []
    if config.get("dedup", {}).get("phash", {}).get("enabled"):
        models.append(("near duplicates", "perceptual hash (DCT: crops, mirrored, borders trimmed)", "built in"))
    if config.get("dedup", {}).get("orb", {}).get("enabled"):
        models.append(("copies (local features)", "ORB keypoints + RANSAC verification", "built in"))
    if clip.get("enabled"):
        weights = clip.get("pretrained") or "RANDOM WEIGHTS"
        models.append(("semantic duplicates", f"open_clip {clip.get('model')}", weights))
        if not clip.get("pretrained"):
            warnings.append(
                "CLIP ran with random weights (dedup.clip.pretrained is not set): its semantic-duplicate "
                "clusters are not meaningful. Give it pretrained weights (docs/weights.md) before acting on them."
            )
    if probe.get("enabled"):
        model = probe.get("model") or ""
        name = os.path.basename(model.rstrip("/")) or model
        models.append(("memorization probe", name, f"{probe.get('metric')} metric, {probe.get('seeds')} seed(s)"))
        if is_lab_model(model):
            warnings.append(
                f"The memorization probe used the lab model ({name}): a small model trained here on 16\u00d716 "
                "crops of the demo images. Its scores say nothing about what Stable Diffusion memorizes; "
                "\u201cnothing memorized\u201d here is not a finding. Score with a real model (probe.model, "
                "docs/weights.md) before publishing."
            )
    else:
        warnings.append("The memorization probe did not run (probe.enabled is false): no caption was scored.")
    keys = info.get("summary", {}).get("keys", 0)
    failed = info.get("summary", {}).get("failed", 0)
    if keys and failed / keys > 0.05:
        warnings.append(f"{failed} of {keys} samples ({failed / keys:.0%}) failed: see Failures by type below.")
    shown = ("memsieve", "apache-beam", "torch", "open_clip_torch", "diffusers", "transformers", "python")
    return {
        "input": config.get("input", {}).get("path", ""),
        "input_format": info.get("input", {}).get("format", ""),
        "output": config.get("output", {}).get("dir", ""),
        "runner": config.get("run", {}).get("runner", ""),
        "models": models,
        "versions": [(k, versions[k]) for k in shown if k in versions],
        "warnings": warnings,
    }


def output_links(out_dir: str) -> list[dict]:
    """The run's files that exist, linked relative to report/ (the folder opens from disk)."""
    from transforms import fsio

    return [
        {"name": name, "href": f"../{name}", "what": what}
        for name, what in TABLES
        if fsio.exists(fsio.join(out_dir, name))
    ]


def next_steps(out_dir: str, info: dict) -> list[dict]:
    """A few concrete actions, with the command where there is one."""
    config, summary, outputs = info.get("config", {}), info.get("summary", {}), info.get("outputs", {})
    # the run's final folder (the report is written in its staging folder, then committed there)
    final = config.get("output", {}).get("dir") or out_dir
    out = final if "://" in final else os.path.abspath(final)
    steps = []
    if header(info)["warnings"] and (config.get("probe", {}).get("enabled") or config.get("dedup", {}).get("clip")):
        steps.append(
            {
                "text": "Read the warnings above first: toy or random weights show the pipeline, not your data.",
                "code": "",
            }
        )
    steps.append(
        {
            "text": f"Publish blocklist.txt: {outputs.get('blocklist_urls', 0)} URLs of content drops; dead links "
            "and unreadable samples are in blocklist.tsv (category column), not in it.",
            "code": "",
        }
    )
    steps.append(
        {
            "text": "Check the kept copy of the largest clusters below (sizes on each card); the rule is dedup.keeper.",
            "code": "",
        }
    )
    steps.append(
        {
            "text": "Try other thresholds without recomputing anything, then write them beside this run:",
            "code": f"memsieve decide {out} --dry-run --set decide.min_duplicate_similarity=0.9\n"
            f"memsieve decide {out} --output {out}-b --set decide.min_duplicate_similarity=0.9",
        }
    )
    if outputs.get("diversify"):
        steps.append(
            {"text": f"Train with the alternative captions of diversify/ ({outputs['diversify']} samples).", "code": ""}
        )
    if summary.get("failed"):
        steps.append(
            {"text": f"Look at the {summary['failed']} failed samples (Failures by type, failures/).", "code": ""}
        )
    steps.append(
        {
            "text": "Query any table with DuckDB:",
            "code": f"duckdb -c \"select decision, count(*) from '{out}/manifest/*.parquet' group by 1\"",
        }
    )
    return steps


def trigger_rows(keywords: list[dict], table: list[dict]) -> list[dict]:
    """Keyword rows with their cluster's thumbnail and whether the cluster table lists it."""
    by_id = {row["id"]: row for row in table}
    out = []
    for r in keywords:
        row = by_id.get(r["cluster_id"])
        thumb = row["thumbs"][0]["src"] if row and row["thumbs"] else None
        out.append(dict(r, listed=row is not None, thumb=thumb))
    return out
