"""The shape of ``run.json`` (versioned), validated when written and in tests."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

RUN_SUMMARY_VERSION = "1"


class Summary(BaseModel):
    model_config = ConfigDict(extra="allow")
    keys: int
    ok: int
    failed: int
    decisions: dict[str, int]
    failures_by_type: dict[str, int]


class RunSummary(BaseModel):
    """run.json: resolved config, versions, counters per stage, timings, input/output counts."""

    model_config = ConfigDict(extra="allow")
    schema_version: str = RUN_SUMMARY_VERSION
    job: str
    config: dict
    versions: dict[str, str]
    input: dict
    counters: dict[str, dict[str, int]]
    outputs: dict[str, int]
    timings_s: dict[str, float]
    summary: Summary
    checksums: dict[str, str] = {}
