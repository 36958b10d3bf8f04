"""Typed, validated job configuration.

A job file is YAML (safe-loaded) mapped onto frozen pydantic models, one per stage.
Unknown fields are errors, and every error names its field (``dedup.phash.max_hamming``).
``--set stage.key=value`` overrides are applied to the raw mapping before validation.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# patterns of the free-text enums (preflight: checked at load, before anything runs)
KEEPER_PATTERN = re.compile(r"^(resolution|earliest|centre|column:[A-Za-z_][A-Za-z0-9_.\-]*(:(asc|desc))?)$")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:[0-9]+)?)$")
RUNNER_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
TRIGGER_KINDS = (
    "word_trigger",
    "object_trigger",
    "implicit_object",
    "template_caption",
    "duplicate_caption",
    "near_duplicate_caption",
)
# the fields ``memsieve decide`` re-tunes (everything else needs a new run)
DECIDE_SECTIONS = ("decide", "diversify")


def _check_pattern(value: str, pattern: re.Pattern, expected: str) -> str:
    if not pattern.match(value):
        raise ValueError(f"{value!r} is not {expected}")
    return value


def _check_device(value: str) -> str:
    return _check_pattern(value, DEVICE_PATTERN, "auto, cpu, mps, cuda or cuda:N")


class ConfigError(ValueError):
    """Bad configuration; the message names the field. The CLI exits 2 on it."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputConfig(Section):
    # a glob of webdataset .tar shards, or a directory in LAION's precomputed-embedding layout
    path: str = Field(min_length=1)
    format: Literal["auto", "webdataset", "laion_embeddings"] = "auto"


class ReadConfig(Section):
    max_image_bytes: int = Field(default=32 * 1024 * 1024, gt=0)
    max_image_pixels: int = Field(default=64_000_000, gt=0)  # decompression-bomb guard
    max_caption_bytes: int = Field(default=16 * 1024, gt=0)
    require_caption: bool = True
    max_members_per_key: int = Field(default=64, gt=0)  # members of one webdataset key
    max_json_bytes: int = Field(default=1024 * 1024, gt=0)  # the json member
    # decoded size, bit depth counted (16-bit RGB: 10 bytes a pixel with its 8-bit copy); 0 = 512 MiB
    max_decoded_bytes: int = Field(default=512 * 1024 * 1024, ge=0)
    image_extensions: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tiff", "tif", "ppm", "pgm", "pbm")


class PhashConfig(Section):
    enabled: bool = True
    # in 64-bit pHash units (scaled to the 256-bit hash): on real photos copies sit at <= 13
    # (crops keeping 85% of each side included), different photos at >= 20; 16 sits in the gap
    max_hamming: int = Field(default=16, ge=0, le=64)
    exact_below: int = Field(default=300_000, ge=0)  # hashes searched exactly (flat); IVF beyond
    nprobe: int = Field(default=32, ge=1)  # IVF cells probed per query above exact_below


class ClipConfig(Section):
    enabled: bool = False
    model: str = "ViT-B-32"  # an open_clip name, local-dir:PATH, or a model-config .json file
    pretrained: str | None = None  # a hub tag, a local checkpoint file/dir, or None (random weights)
    batch_size: int = Field(default=32, gt=0)
    threshold: float = Field(default=0.95, gt=0, le=1)  # cosine for a semantic duplicate
    device: str = "auto"  # auto | cpu | cuda[:N] | mps
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # pretrained None means random weights: refused unless the job says so (tests, cost benchmarks)
    allow_random_weights: bool = False

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return _check_device(v)

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("an open_clip model name, local-dir:PATH or a model-config .json is required")
        return v


class OrbConfig(Section):
    """Local-feature copies (transforms/local_features.py): what the hashes miss (crops anywhere,
    rotations, memes, screenshots). Off by default; the demo job turns it on."""

    enabled: bool = False  # run the ORB local-feature copy stage (features computed with the decode)
    n_features: int = Field(default=500, ge=16)  # ORB keypoints per image
    side: int = Field(default=512, ge=64)  # images are downscaled to this long side
    min_side: int = Field(default=256, ge=32)  # ... and small ones upscaled to this
    fast_threshold: int = Field(default=12, ge=1)  # FAST corner threshold of the ORB detector
    tables: int = Field(default=8, ge=1, le=64)  # visual-word hash tables per descriptor
    word_bits: int = Field(default=24, ge=8, le=40)  # sampled descriptor bits per word
    max_df: int = Field(default=15, ge=2)  # a word in more images is a stop-word
    # word_bits and tables suit this many images; a larger collection gets a bit per doubling and
    # more tables (transforms/local_features.vocabulary); 0 = fixed
    vocabulary_images: int = Field(default=100_000, ge=0)
    word_partitions: int = Field(default=64, ge=1)  # shuffle partitions of the word space (raise at scale)
    min_votes: int = Field(default=8, ge=1)  # shared words that make a candidate pair
    max_candidates: int = Field(default=32, ge=1)  # candidates verified per image (most votes first)
    only_unmatched: bool = False  # skip candidate pairs whose two images both have a hash match (cost lever)
    ratio: float = Field(default=0.8, gt=0, le=1)  # Lowe's ratio test
    ransac_px: float = Field(default=6.0, gt=0)  # RANSAC reprojection threshold (working pixels)
    min_inliers: int = Field(default=10, ge=4)  # RANSAC affine inliers a copy needs
    max_anisotropy: float = Field(default=1.6, ge=1)  # singular-value ratio of the affine fit
    min_overlap: float = Field(default=0.75, gt=0, le=1)  # aligned overlap / the smaller frame
    min_agreement: float = Field(default=0.6, gt=0, le=1)  # textured photo cells that agree once aligned
    min_cells: int = Field(default=8, ge=1)  # textured cells the agreement needs
    # share of one image's textured content that lies inside the other's aligned frame (the larger
    # of the two): a copy is part of its original or holds all of it; burst shots each show more
    min_contained: float = Field(default=0.9, ge=0, le=1)
    min_coverage: float = Field(default=0.0, ge=0, le=1)  # textured 4x4 blocks of the inner image holding inliers (off)


class SscdConfig(Section):
    """Meta's SSCD copy descriptor, for users who bring its TorchScript weights (a local file)."""

    enabled: bool = False  # run the SSCD embedder (needs weights)
    weights: str | None = None  # path to an SSCD TorchScript file (e.g. sscd_disc_mixup.torchscript.pt)
    size: int = Field(default=288, ge=32)  # short side the image is resized to (SSCD's eval setting)
    batch_size: int = Field(default=32, gt=0)  # images per forward pass
    threshold: float = Field(default=0.5, gt=0, le=1)  # cosine for a copy (SD3's dedup threshold)
    device: str = "auto"  # auto | cpu | cuda[:N] | mps

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return _check_device(v)

    @model_validator(mode="after")
    def _weights_when_enabled(self):
        if self.enabled and not self.weights:
            raise ValueError("weights: a local SSCD TorchScript file is required when sscd is enabled")
        return self


class ClusterConfig(Section):
    n_cells: int = Field(default=0, ge=0)  # 0 = choose from the data size (about 1.4 sqrt(n))
    top_m: int = Field(default=2, ge=1)  # cells each vector is assigned to (SemDeDup: 1)
    sample_size: int = Field(default=0, ge=0)  # k-means training sample; 0 = 40 points per cell
    threshold: float = Field(default=0.9, gt=0, le=1)  # cosine for a near-duplicate (precomputed embeddings)
    cell_groups: int = Field(default=64, ge=1)  # cells travel in this many groups (elements) through the shuffle
    # a row also joins its second-nearest cell when that centroid is within this cosine of the nearest
    second_cell_margin: float = Field(default=0.02, ge=0)
    single_cell_below: int = Field(default=20_000, ge=0)  # up to this many rows: one cell, an exact search


class DedupConfig(Section):
    exact: bool = True  # same image bytes
    exact_pixels: bool = True  # same decoded pixels in other bytes (costs a hash of the pixels)
    phash: PhashConfig = PhashConfig()
    clip: ClipConfig = ClipConfig()
    orb: OrbConfig = OrbConfig()
    sscd: SscdConfig = SscdConfig()
    cluster: ClusterConfig = ClusterConfig()
    keeper: str = "resolution"  # resolution | earliest | centre | column:<name>[:asc|desc]
    embeddings_dir: str | None = None  # persisted per-shard embeddings; default OUTPUT/embeddings
    incremental_from: str | None = None  # an earlier run's output: dedup new shards against it

    @field_validator("keeper")
    @classmethod
    def _keeper(cls, v: str) -> str:
        return _check_pattern(v, KEEPER_PATTERN, "resolution, earliest, centre or column:NAME[:asc|desc]")


class TriggersConfig(Section):
    enabled: bool = True
    min_keyword_count: int = Field(default=20, ge=1)
    min_pair_count: int = Field(default=10, ge=1)
    min_p_cluster_given_keyword: float = Field(default=0.5, ge=0, le=1)
    min_p_keyword_given_cluster: float = Field(default=0.3, ge=0, le=1)
    max_q_value: float = Field(default=0.01, gt=0, le=1)
    bigrams: bool = False
    full_duplication_share: float = Field(default=0.5, gt=0, le=1)  # modal caption share for "full"
    near_duplicate_captions: bool = True
    template_min_df: int = Field(default=20, ge=1)  # a word this frequent is template text, not a slot
    template_min_count: int = Field(default=5, ge=2)
    template_min_distinct: int = Field(default=3, ge=2)
    objects: tuple[str, ...] = ()  # empty = the default vocabulary (transforms/objects.py)
    object_source: Literal["auto", "metadata", "clip", "none"] = "auto"
    min_object_lift: float = Field(default=2.0, ge=1)
    min_p_object_given_keyword: float = Field(default=0.5, ge=0, le=1)
    related_pairs: tuple[str, ...] = ()  # extra "keyword:object" pairs that are implicit intended
    related_similarity: float = Field(default=0.8, gt=0, le=1)  # text-embedding cosine for "related"

    @field_validator("related_pairs")
    @classmethod
    def _pairs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for pair in v:
            parts = pair.split(":")
            if len(parts) != 2 or not all(p.strip() for p in parts):
                raise ValueError(f"{pair!r} is not keyword:object")
        return v


class ProbeConfig(Section):
    enabled: bool = False
    model: str | None = None  # a local diffusers directory or a hub id
    metric: Literal["magnitude", "anisotropy"] = "magnitude"
    seeds: int = Field(default=1, ge=1)
    batch_size: int = Field(default=16, gt=0)
    budget: Literal["all", "cluster_representatives", "triggers", "sample"] = "all"
    sample_fraction: float = Field(default=1.0, gt=0, le=1)
    threshold: float | None = None  # None = calibrate on reference captions
    reference_captions: str | None = None
    target_fpr: float = Field(default=0.01, gt=0, lt=1)
    device: str = "auto"

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return _check_device(v)

    @model_validator(mode="after")
    def _model_when_enabled(self):
        if self.enabled and not (self.model or "").strip():
            raise ValueError("model: a local diffusers folder or a cached hub id is required when probe.enabled")
        return self


class DecideConfig(Section):
    """The policy's switches and thresholds; ``memsieve decide RUN_DIR --set decide.x=...`` re-tunes
    them over the stored annotations (nothing is recomputed)."""

    drop_failed: bool = True
    drop_duplicates: bool = True  # drop non-representative members of duplicate clusters
    # a member is dropped only when its similarity to its cluster's representative reaches this
    # (0 = every member). Tightening only: clusters were formed at the embedders' own thresholds.
    min_duplicate_similarity: float = Field(default=0.0, ge=0, le=1)
    drop_flagged_probe: bool = True
    # None = the probe's own flag (its calibrated threshold); a number re-flags from the stored score
    probe_threshold: float | None = None
    diversify_full_duplication: bool = True
    min_full_duplication_size: int = Field(default=2, ge=2)  # smaller full-duplication clusters are kept as is
    diversify_triggers: bool = True
    # trigger codes (their kind, before the first ":") that call for caption diversification;
    # implicit_object:* (an intended association) is recorded on the annotation only
    trigger_kinds: tuple[str, ...] = (
        "word_trigger",
        "object_trigger",
        "template_caption",
        "duplicate_caption",
        "near_duplicate_caption",
    )

    @field_validator("trigger_kinds")
    @classmethod
    def _kinds(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [k for k in v if k not in TRIGGER_KINDS]
        if unknown:
            raise ValueError(
                f"unknown trigger kind(s) {', '.join(map(repr, unknown))}; known: {', '.join(TRIGGER_KINDS)}"
            )
        return v


class DiversifyConfig(Section):
    enabled: bool = True
    strategies: tuple[Literal["MC", "RT", "CWR", "RC", "RNA"], ...] = ("MC", "RT", "CWR", "RC", "RNA")
    n_alternatives: int = Field(default=5, ge=1)
    gaussian_noise_sigma: float = Field(default=0.1, ge=0)  # GN: recorded for the training side
    train_probability: float = Field(default=0.1, gt=0, le=1)  # per strategy at train time (recorded)
    vocabulary_size: int = Field(default=5000, ge=1)  # RT/RC tokens: the run's most common caption words
    max_cluster_captions: int = Field(default=20, ge=1)  # MC: other captions kept per duplicate cluster


class OutputConfig(Section):
    dir: str = Field(default="out/run", min_length=1)
    filtered_shards: bool = False
    report: bool = True


class RunConfig(Section):
    runner: str = "DirectRunner"
    max_failure_ratio: float = Field(default=0.5, gt=0, le=1)
    seed: int = 0
    cache: bool = True  # per-shard cache of decoded/hashed results: a killed run resumes
    cache_dir: str | None = None  # default OUTPUT/cache
    debug_sleep_per_shard_s: float = Field(default=0.0, ge=0)  # tests only: slow shards down

    @field_validator("runner")
    @classmethod
    def _runner(cls, v: str) -> str:
        return _check_pattern(v, RUNNER_PATTERN, "a Beam runner name (DirectRunner) or a dotted class path")


class JobConfig(Section):
    name: str = Field(min_length=1)
    input: InputConfig
    output: OutputConfig = OutputConfig()
    read: ReadConfig = ReadConfig()
    dedup: DedupConfig = DedupConfig()
    triggers: TriggersConfig = TriggersConfig()
    probe: ProbeConfig = ProbeConfig()
    decide: DecideConfig = DecideConfig()
    diversify: DiversifyConfig = DiversifyConfig()
    run: RunConfig = RunConfig()


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(job)"
        msg = e["msg"].removeprefix("Value error, ")
        sub = re.match(r"^([a-z_]+): (.*)$", msg, re.S)
        if sub and e["type"] == "value_error" and e["loc"]:  # a section's check naming its field
            field, msg = f"{field}.{sub.group(1)}", sub.group(2)
        lines.append(f"{field}: {msg}")
    return "; ".join(lines)


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.c=value`` override to a raw mapping (value parsed as YAML)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE")
    dotted, value = assignment.split("=", 1)
    parts = [p for p in dotted.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {assignment!r}: empty key")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(value) if value != "" else ""


def check_decide_overrides(overrides: list[str]) -> None:
    """``memsieve decide`` re-tunes only decide.* and diversify.*: anything else is refused."""
    for assignment in overrides:
        dotted = assignment.split("=", 1)[0].strip()
        if dotted.split(".", 1)[0] not in DECIDE_SECTIONS or "." not in dotted:
            raise ConfigError(
                f"{dotted or assignment}: memsieve decide changes only decide.* and diversify.* fields; "
                "other fields need a new run (memsieve run)"
            )


def load_raw(path: str | Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"job file {path}: {exc.strerror or exc}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"job file {path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"job file {path}: the top level must be a mapping")
    return raw


def parse_config(raw: dict[str, Any]) -> JobConfig:
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None


def load_job(
    path: str | Path,
    overrides: list[str] | None = None,
    input_path: str | None = None,
    output_dir: str | None = None,
) -> JobConfig:
    raw = load_raw(path)
    for assignment in overrides or []:
        apply_override(raw, assignment)
    if input_path is not None:
        raw.setdefault("input", {})
        if not isinstance(raw["input"], dict):
            raise ConfigError("input: must be a mapping")
        raw["input"]["path"] = input_path
    if output_dir is not None:
        raw.setdefault("output", {})
        if not isinstance(raw["output"], dict):
            raise ConfigError("output: must be a mapping")
        raw["output"]["dir"] = output_dir
    return parse_config(raw)
