"""CLIP image (and text) embeddings with open_clip: batched, loaded once per worker, persisted per shard.

``ClipConfig.model`` is an open_clip model name (``ViT-B-32``), ``local-dir:/path`` (a folder with
``open_clip_config.json`` and weights), or a path to a model-config ``.json`` (registered under
its file stem; handy for tiny test models). ``pretrained`` is a tag, a local checkpoint file, a
local folder (loaded as ``local-dir:``), or None for random weights (tests, cost benchmarks).
Images go through the model's own preprocessing. Vectors leave the stage L2-normalised, float32,
in batches ``(keys, vectors[n, d])``; samples that do not decode go to ``Failure(stage="embed")``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import numpy as np

from pipeline import progress
from schemas.elements import Failure, Sample
from transforms.decode import DecodeError, decode_image

log = logging.getLogger(__name__)

EMBEDDINGS = "embeddings"
FAILURES = "failures"


@dataclass
class ClipBundle:
    """What one worker holds: the model, its preprocessing, its tokenizer, where and how it runs."""

    model: Any
    preprocess: Any
    tokenizer: Any
    device: str
    dtype: Any  # torch dtype
    dim: int


@functools.lru_cache(maxsize=1)
def cpu_bf16_is_fast() -> bool:
    """bf16 pays on CPUs with AMX tiles; on AVX-512 alone oneDNN's bf16 matmul is slower than fp32."""
    import torch

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            has_amx = any(line.startswith("flags") and " amx_bf16" in line for line in f)
    except OSError:
        has_amx = False
    return bool(has_amx and torch.backends.mkldnn.is_available() and torch._C._cpu._init_amx())


def resolve_device_dtype(device: str, precision: str):
    """Config ``device``/``precision`` -> (torch device, torch dtype): fp16 on CUDA, bf16 on fast CPUs."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if precision == "auto":
        precision = "fp16" if device.startswith("cuda") else ("bf16" if cpu_bf16_is_fast() else "fp32")
    return device, {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _model_source(model: str, pretrained: str | None) -> tuple[str, str | None]:
    """Resolve local paths: a model-config .json is registered; a checkpoint folder is local-dir:."""
    import open_clip

    if model.endswith(".json") and os.path.isfile(model):
        open_clip.add_model_config(model)
        model = os.path.splitext(os.path.basename(model))[0]
    if pretrained and os.path.isdir(pretrained):
        return f"local-dir:{pretrained}", None
    return model, pretrained


def load_clip(
    model: str, pretrained: str | None = None, device: str = "auto", precision: str = "auto", seed: int = 0
) -> ClipBundle:
    """Build the model once (call from DoFn.setup); weights never download unless a hub tag says so."""
    import open_clip
    import torch

    device, dtype = resolve_device_dtype(device, precision)
    name, weights = _model_source(model, pretrained)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # random weights (pretrained None) are the same on every worker
        net, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=weights, device=device)
    net = net.to(dtype=dtype).eval()
    tokenizer = open_clip.get_tokenizer(name)
    from PIL import Image

    with torch.inference_mode():  # one blank image through the model's own path gives the dimension
        probe = preprocess(Image.new("RGB", (8, 8)))[None].to(device, dtype)
        dim = int(net.encode_image(probe).shape[-1])
    log.info("clip: %s (%s) on %s as %s, dim %d", name, weights or "random weights", device, dtype, dim)
    return ClipBundle(net, preprocess, tokenizer, device, dtype, dim)


def _normalised(features) -> np.ndarray:
    vectors = features.float().cpu().numpy()
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def embed_images(bundle: ClipBundle, images: list) -> np.ndarray:
    """RGB PIL images -> (n, dim) float32 unit vectors, one forward pass."""
    import torch

    if not images:
        return np.zeros((0, bundle.dim), dtype=np.float32)
    batch = torch.stack([bundle.preprocess(im) for im in images]).to(bundle.device, bundle.dtype)
    with torch.inference_mode():
        return _normalised(bundle.model.encode_image(batch))


def embed_texts(bundle: ClipBundle, texts: list[str]) -> np.ndarray:
    """Texts -> (n, dim) float32 unit vectors from the text tower (object tagging prompts)."""
    import torch

    if not texts:
        return np.zeros((0, bundle.dim), dtype=np.float32)
    tokens = bundle.tokenizer(list(texts)).to(bundle.device)
    with torch.inference_mode():
        return _normalised(bundle.model.encode_text(tokens))


# ---- persistence: OUTPUT/embeddings/clip/<model tag>/<shard>.npy + <shard>.keys.parquet ----


def model_tag(model: str, pretrained: str | None) -> str:
    """A folder name that changes with the model, so vectors of two models never mix."""
    raw = f"{os.path.basename(model)}--{os.path.basename(str(pretrained).rstrip('/')) if pretrained else 'random'}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", raw)


def shard_paths(root: str, shard: str) -> tuple[str, str]:
    """``shard`` is the shard's identity plus its content digest (``content_digest``)."""
    from transforms import fsio

    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", shard)
    return fsio.join(root, f"{safe}.npy"), fsio.join(root, f"{safe}.keys.parquet")


def sample_digest(sample: Sample) -> tuple[str, int]:
    """(shard, 64-bit hash of the sample's key and image digest): summed per shard, order-free."""
    h = hashlib.sha256(f"{sample.key}\0{sample.sha256}".encode("utf-8", "surrogateescape")).hexdigest()
    return sample.shard, int(h[:16], 16)


def content_digest(item: tuple[str, int]) -> tuple[str, str]:
    """(shard, summed sample hashes) -> (shard, "<shard>-<16 hex>"): a shard whose keys or image
    bytes change gets a new name, so stale vectors are never read back."""
    shard, total = item
    return shard, f"{shard}-{total % (1 << 64):016x}"


def save_shard_embeddings(root: str, shard: str, keys: list[str], vectors: np.ndarray) -> str:
    """Write one shard's vectors sorted by key; atomic (temp files, then rename; keys last)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from transforms import fsio

    fsio.makedirs(root)
    order = np.argsort(np.asarray(keys, dtype=object), kind="stable")
    npy, parquet = shard_paths(root, shard)
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(vectors[order]))
    fsio.write_bytes(npy, buf.getvalue())
    out = io.BytesIO()
    pq.write_table(pa.table({"key": [keys[i] for i in order]}), out)
    fsio.write_bytes(parquet, out.getvalue())
    return npy


def has_shard_embeddings(root: str, shard: str) -> bool:
    from transforms import fsio

    return all(fsio.isfile(p) for p in shard_paths(root, shard))


def load_shard_embeddings(root: str, shard: str) -> tuple[list[str], np.ndarray] | None:
    """A shard's persisted (keys, vectors), or None when absent or inconsistent."""
    import io

    import pyarrow.parquet as pq

    from transforms import fsio

    npy, parquet = shard_paths(root, shard)
    if not has_shard_embeddings(root, shard):
        return None
    keys = pq.read_table(io.BytesIO(fsio.read_bytes(parquet))).column("key").to_pylist()
    vectors = np.load(io.BytesIO(fsio.read_bytes(npy)))
    if len(keys) != len(vectors):
        log.warning("clip: %s has %d keys but %d vectors; re-embedding it", npy, len(keys), len(vectors))
        return None
    return keys, vectors


# ---- Beam ----


class EmbedClipFn(beam.DoFn):
    """A batch of Samples -> per-shard pieces (shard, (keys, vectors)) and Failures."""

    def __init__(self, cfg, max_pixels: int):
        self.cfg = cfg
        self.max_pixels = max_pixels
        self._bundle: ClipBundle | None = None

    def setup(self):
        from pipeline import logs

        progress.begin("embed")
        logs.quiet_hf(load=True)
        self._bundle = load_clip(self.cfg.model, self.cfg.pretrained, self.cfg.device, self.cfg.precision)
        self._embedded = beam.metrics.Metrics.counter("embed_clip", "embedded")

    def process(self, batch: list[Sample]) -> Iterator:
        images, kept = [], []
        for sample in batch:
            try:
                image = decode_image(sample.image, sample.image_ext, self.max_pixels)
                images.append(self._bundle.preprocess(image))
                kept.append(sample)
            except DecodeError as exc:
                yield self._failure(sample, exc.error_type, str(exc))
            except Exception as exc:  # noqa: BLE001 - a sample the preprocessing rejects; its batch goes on
                yield self._failure(sample, "preprocess_error", f"{type(exc).__name__}: {exc}")
        if not kept:
            return
        vectors = self._forward(images)
        self._embedded.inc(len(kept))
        progress.advance("embed", len(kept))
        by_shard: dict[str, list[int]] = {}
        for i, sample in enumerate(kept):
            by_shard.setdefault(sample.shard, []).append(i)
        for shard, rows in sorted(by_shard.items()):
            yield shard, ([kept[i].key for i in rows], vectors[rows])

    def _forward(self, tensors: list) -> np.ndarray:
        import torch

        b = self._bundle
        with torch.inference_mode():
            return _normalised(b.model.encode_image(torch.stack(tensors).to(b.device, b.dtype)))

    def _failure(self, sample: Sample, error_type: str, message: str):
        beam.metrics.Metrics.counter("embed_clip", f"failed_{error_type}").inc()
        failure = Failure(
            sample.key, sample.shard, "embed", error_type, message[:500], sample.url, sample.caption, sample.sha256
        )
        return beam.pvalue.TaggedOutput(FAILURES, failure)


def _save_shard(item, root: str, names: dict) -> Iterator[str]:
    shard, pieces = item
    pieces = list(pieces)
    keys = [k for ks, _ in pieces for k in ks]
    yield save_shard_embeddings(root, names[shard], keys, np.concatenate([v for _, v in pieces]))


def _load_shard(named: tuple[str, str], root: str) -> Iterator[tuple[list[str], np.ndarray]]:
    found = load_shard_embeddings(root, named[1])
    if found is not None:
        yield found


class EmbedClip(beam.PTransform):
    """Samples -> {"embeddings": (keys, float32 unit vectors[n, d]), "failures": Failure[, "written": path]}.

    With ``embeddings_dir`` (e.g. OUTPUT/embeddings), vectors are persisted per shard under
    ``<dir>/clip/<model tag>/`` and a shard already there is read back instead of re-embedded.
    """

    def __init__(self, cfg, max_pixels: int = 64_000_000, embeddings_dir: str | None = None):
        super().__init__()
        self.cfg = cfg
        self.max_pixels = max_pixels
        self.root = (
            os.path.join(embeddings_dir, "clip", model_tag(cfg.model, cfg.pretrained)) if embeddings_dir else None
        )

    def expand(self, samples):
        reused = None
        if self.root:
            root = self.root
            # vectors are found again by shard identity *and* content: one name per shard (a
            # side input sized by the number of shards, not samples)
            names = (
                samples
                | "SampleDigest" >> beam.Map(sample_digest)
                | "ShardDigest" >> beam.CombinePerKey(sum)
                | "ShardName" >> beam.Map(content_digest)
            )
            done = names | "Persisted" >> beam.Filter(lambda kv: has_shard_embeddings(root, kv[1]))
            reused = done | "LoadPersisted" >> beam.FlatMap(_load_shard, root=root)
            samples = samples | "NotPersisted" >> beam.Filter(
                lambda s, done_set: s.shard not in done_set, done_set=beam.pvalue.AsDict(done)
            )
        bs = self.cfg.batch_size
        from transforms.outputs import multi_output

        batches = samples | "Batch" >> beam.BatchElements(min_batch_size=bs, max_batch_size=bs)
        out = multi_output(batches, "Embed", EmbedClipFn(self.cfg, self.max_pixels), [FAILURES], "pieces")
        embeddings = out["pieces"] | "DropShard" >> beam.Map(lambda kv: kv[1])
        outputs = {FAILURES: out[FAILURES]}
        if self.root:
            outputs["written"] = (
                out["pieces"]
                | "ByShard" >> beam.GroupByKey()
                | "Save" >> beam.FlatMap(_save_shard, root=self.root, names=beam.pvalue.AsDict(names))
            )
            embeddings = (embeddings, reused) | "WithPersisted" >> beam.Flatten()
        outputs[EMBEDDINGS] = embeddings
        return outputs
