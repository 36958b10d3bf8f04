"""Typed elements that travel between the pipeline's stages.

Every element carries the sample ``key`` (the webdataset ``__key__``) so joins use it.
Elements are frozen dataclasses: cheap to pickle, hashable where needed, and typed.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sample:
    """One webdataset sample as read from a shard (image bytes still encoded)."""

    key: str
    shard: str
    url: str
    caption: str
    meta_json: str  # the sample's json member, re-serialized (sorted keys) or "{}"
    image: bytes
    image_ext: str  # member extension: jpg, png, webp, ...
    sha256: str  # sha256 of the image bytes in the tar


@dataclass(frozen=True)
class Failure:
    """A dead-letter record: a sample (or input row) that could not be processed."""

    key: str
    shard: str
    stage: str  # read | download | decode | embed | probe | ...
    error_type: str  # a specific code, e.g. corrupt_image, truncated_tar, bad_caption_encoding
    message: str
    url: str = ""
    caption: str = ""
    sha256: str = ""


@dataclass(frozen=True)
class SampleInfo:
    """What the annotation stages keep of a decoded sample (no pixels)."""

    key: str
    shard: str
    url: str
    caption: str
    sha256: str
    pixel_sha256: str  # sha256 of the decoded RGB pixels plus their shape
    width: int
    height: int
    meta_json: str = "{}"
    original_width: int = 0  # the sidecar's / metadata's size before img2dataset resized (0: unknown)
    original_height: int = 0
    image_bytes: int = 0  # encoded size of the image member (0: no pixels, e.g. LAION embeddings)
    notes: str = ""  # non-fatal findings, e.g. "format_mismatch:webp_as_jpg"


@dataclass(frozen=True)
class Edge:
    """A duplicate edge between two samples found by one embedder (key_a < key_b)."""

    key_a: str
    key_b: str
    similarity: float
    embedder: str  # exact | phash | clip | ...


@dataclass(frozen=True, eq=False)
class EdgeBatch:
    """Many duplicate edges of one embedder as columns (what a batched search emits instead of
    one ``Edge`` per pair): ``key_a``/``key_b`` numpy arrays of key strings with key_a[i] < key_b[i],
    ``similarity`` a float array of the same length."""

    key_a: object
    key_b: object
    similarity: object
    embedder: str

    def __len__(self) -> int:
        return len(self.key_a)

    def edges(self):
        """-> one ``Edge`` per row (for consumers that still take single edges)."""
        for a, b, s in zip(self.key_a.tolist(), self.key_b.tolist(), self.similarity.tolist(), strict=True):
            yield Edge(a, b, float(s), self.embedder)


@dataclass(frozen=True)
class Neighbour:
    """A sample's nearest neighbour under one embedder, so thresholds can move later."""

    key: str
    embedder: str
    nn_key: str
    nn_similarity: float


@dataclass(frozen=True)
class ClusterAssignment:
    """A sample's duplicate cluster (union over all embedders' edges)."""

    key: str
    cluster_id: str
    cluster_size: int
    is_representative: bool
    embedder: str  # the strongest embedder that linked it: exact > phash > clip
    similarity: float  # to the cluster's representative (1.0 for the representative)
    shard: str = ""  # the member's shard (its first shard when the key repeats): routes it to its shard


@dataclass(frozen=True)
class Annotation:
    """Everything known about one key, joined; the policy stage reads only this."""

    key: str
    shard: str
    url: str = ""
    caption: str = ""
    sha256: str = ""
    status: str = "ok"  # ok | failed
    failure_stage: str = ""
    failure_type: str = ""
    width: int = 0
    height: int = 0
    cluster_id: str = ""
    cluster_size: int = 1
    is_representative: bool = True
    cluster_embedder: str = ""
    cluster_similarity: float = 1.0
    duplication: str = ""  # "" | full | partial (caption duplication of its cluster)
    trigger_codes: tuple[str, ...] = field(default_factory=tuple)
    probe_score: float | None = None
    probe_flagged: bool = False
    original_width: int = 0  # before img2dataset resized (the sidecar's); 0: unknown
    original_height: int = 0
