"""SSCD copy descriptors for users who bring Meta's TorchScript weights (a local file).

SSCD (Pizzi et al., "A Self-Supervised Descriptor for Image Copy Detection", CVPR 2022) is the
learned copy descriptor Stable Diffusion 3 and DINOv2 dedup with: images resized so the short
side is ``size`` (288 in SSCD's evaluation), ImageNet mean/std normalisation, the TorchScript
model's descriptor L2-normalised; two images are copies at cosine >= ``threshold`` (0.5, SD3's).
Edges come from the same cell search as CLIP (``transforms.ann_edges.VectorEdges``). Nothing here
is tuned or measured with the real weights (none are available offline).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import apache_beam as beam
import numpy as np

EMBEDDER = "sscd"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
log = logging.getLogger(__name__)


def preprocess(img, size: int) -> np.ndarray:
    """RGB PIL image -> (3, H, W) float32: short side ``size`` (aspect kept), ImageNet-normalised."""
    from PIL import Image

    w, h = img.size
    scale = size / min(w, h)
    img = img.convert("RGB").resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
    x = np.asarray(img, dtype=np.float32) / 255.0
    return ((x - np.array(MEAN, np.float32)) / np.array(STD, np.float32)).transpose(2, 0, 1)


def load_model(weights: str | None, device: str = "auto"):
    """The TorchScript file at ``weights`` (a ConfigError-like ValueError names the field otherwise)."""
    import os

    import torch

    if not weights or not os.path.isfile(weights):
        raise ValueError(f"dedup.sscd.weights: {weights!r} is not a TorchScript file")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.jit.load(weights, map_location=device).eval(), device


def embed(model, device: str, arrays: list[np.ndarray]) -> np.ndarray:
    """Preprocessed images -> (n, d) float32 unit vectors; one forward pass per distinct shape."""
    import torch

    out = [None] * len(arrays)
    by_shape: dict[tuple, list[int]] = {}
    for i, a in enumerate(arrays):
        by_shape.setdefault(a.shape, []).append(i)
    with torch.inference_mode():
        for rows in by_shape.values():
            x = torch.from_numpy(np.stack([arrays[i] for i in rows])).to(device)
            v = model(x).float().cpu().numpy()
            v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
            for i, row in zip(rows, v, strict=True):
                out[i] = row
    return np.stack(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)


class EmbedSscdFn(beam.DoFn):
    """A batch of Samples -> (keys, unit vectors); undecodable samples are skipped (reported upstream)."""

    def __init__(self, cfg, max_pixels: int):
        self.cfg, self.max_pixels = cfg, max_pixels

    def setup(self):
        self.model, self.device = load_model(self.cfg.weights, self.cfg.device)

    def process(self, batch) -> Iterator:
        from transforms.decode import DecodeError, decode_image

        keys, arrays = [], []
        for sample in batch:
            try:
                arrays.append(preprocess(decode_image(sample.image, sample.image_ext, self.max_pixels), self.cfg.size))
                keys.append(sample.key)
            except DecodeError:
                beam.metrics.Metrics.counter(EMBEDDER, "undecodable").inc()
        if keys:
            yield keys, embed(self.model, self.device, arrays)


class SscdCopies(beam.PTransform):
    """Samples -> {"edges", "neighbours"}: SSCD descriptors, copy edges at cosine >= threshold."""

    def __init__(self, cfg, cluster_cfg, max_pixels: int = 64_000_000, seed: int = 0):
        super().__init__()
        self.cfg, self.cluster_cfg, self.max_pixels, self.seed = cfg, cluster_cfg, max_pixels, seed

    def expand(self, samples):
        from transforms.ann_edges import VectorEdges

        bs = self.cfg.batch_size
        batches = samples | "Batch" >> beam.BatchElements(min_batch_size=bs, max_batch_size=bs)
        vectors = batches | "Embed" >> beam.ParDo(EmbedSscdFn(self.cfg, self.max_pixels))
        return vectors | "SscdEdges" >> VectorEdges(self.cfg.threshold, EMBEDDER, self.cluster_cfg, self.seed)
