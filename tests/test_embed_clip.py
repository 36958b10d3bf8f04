import hashlib
import io
import json

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from pipeline.config import ClipConfig
from schemas.elements import Sample
from transforms.embed_clip import (
    EmbedClip,
    content_digest,
    cpu_bf16_is_fast,
    embed_images,
    embed_texts,
    load_clip,
    load_shard_embeddings,
    model_tag,
    resolve_device_dtype,
    sample_digest,
    save_shard_embeddings,
    shard_paths,
)

DIM = 32
TINY = {
    "embed_dim": DIM,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """A tiny open_clip architecture as a model-config file (random weights: the model is not the point)."""
    path = tmp_path_factory.mktemp("clip") / "memsieve-tiny-clip.json"
    path.write_text(json.dumps(TINY))
    return str(path)


@pytest.fixture(scope="module")
def bundle(tiny_model):
    import torch

    torch.manual_seed(0)
    return load_clip(tiny_model, None, device="cpu", precision="fp32")


def _image(seed: int, size=(64, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8"))


def _jpeg_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _sample(key: str, shard: str, data: bytes) -> Sample:
    digest = hashlib.sha256(data).hexdigest()  # as the reader records it
    return Sample(key, shard, f"http://x/{key}.jpg", f"caption {key}", "{}", data, "jpg", digest)


def test_image_and_text_towers_give_unit_vectors(bundle):
    vectors = embed_images(bundle, [_image(0), _image(1), _image(0)])
    assert bundle.dim == DIM and vectors.shape == (3, DIM) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(vectors[0], vectors[2], atol=1e-6)  # deterministic
    assert not np.allclose(vectors[0], vectors[1])
    texts = embed_texts(bundle, ["a photo of a dog", "a photo of a flag"])
    assert texts.shape == (2, DIM)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(texts[0], texts[1])
    assert embed_texts(bundle, []).shape == (0, DIM)


def test_precision_resolution():
    import torch

    assert resolve_device_dtype("cpu", "fp32") == ("cpu", torch.float32)
    assert resolve_device_dtype("cpu", "bf16") == ("cpu", torch.bfloat16)
    expected = torch.bfloat16 if cpu_bf16_is_fast() else torch.float32
    assert resolve_device_dtype("cpu", "auto") == ("cpu", expected)


def test_bf16_model_close_to_fp32(tiny_model):
    import torch

    torch.manual_seed(0)
    fp32 = load_clip(tiny_model, None, device="cpu", precision="fp32")
    torch.manual_seed(0)
    bf16 = load_clip(tiny_model, None, device="cpu", precision="bf16")
    images = [_image(3), _image(4)]
    cos = (embed_images(fp32, images) * embed_images(bf16, images)).sum(axis=1)
    assert (cos > 0.98).all()


def test_persist_round_trip(tmp_path):
    vectors = np.arange(6, dtype=np.float32).reshape(3, 2)
    save_shard_embeddings(str(tmp_path), "00001", ["c", "a", "b"], vectors)
    keys, loaded = load_shard_embeddings(str(tmp_path), "00001")
    assert keys == ["a", "b", "c"]
    np.testing.assert_array_equal(loaded, vectors[[1, 2, 0]])
    assert load_shard_embeddings(str(tmp_path), "00002") is None
    np.save(shard_paths(str(tmp_path), "00001")[0], vectors[:2])  # keys and vectors disagree
    assert load_shard_embeddings(str(tmp_path), "00001") is None
    assert model_tag("ViT-B-32", None) == "ViT-B-32--random"


def _summary(batch):
    keys, vectors = batch
    return [(k, v.shape[0], round(float(np.linalg.norm(v)), 4)) for k, v in zip(keys, vectors, strict=True)]


def test_embed_clip_on_pipeline_with_dead_letters_and_reuse(tiny_model, tmp_path):
    cfg = ClipConfig(enabled=True, model=tiny_model, batch_size=2, device="cpu", precision="fp32")
    samples = [
        _sample("a1", "s0", _jpeg_bytes(_image(0))),
        _sample("a2", "s0", b"not an image"),
        _sample("b1", "s1", _jpeg_bytes(_image(1))),
        _sample("b2", "s1", _jpeg_bytes(_image(2))),
    ]
    with TestPipeline(runner="DirectRunner") as p:
        out = p | beam.Create(samples) | EmbedClip(cfg, embeddings_dir=str(tmp_path))
        rows = out["embeddings"] | beam.FlatMap(_summary)
        assert_that(rows, equal_to([("a1", DIM, 1.0), ("b1", DIM, 1.0), ("b2", DIM, 1.0)]))
        failures = out["failures"] | beam.Map(lambda f: (f.key, f.stage, f.error_type))
        assert_that(failures, equal_to([("a2", "embed", "unidentified_image")]), label="failures")
    root = str(tmp_path / "clip" / model_tag(tiny_model, None))
    s1 = _persisted_name(samples, "s1")
    keys, vectors = load_shard_embeddings(root, s1)
    assert keys == ["b1", "b2"] and vectors.shape == (2, DIM)

    save_shard_embeddings(root, s1, keys, np.zeros_like(vectors))  # a re-run reads shard s1 back
    with TestPipeline(runner="DirectRunner") as p:
        out = p | beam.Create(samples) | EmbedClip(cfg, embeddings_dir=str(tmp_path))
        rows = out["embeddings"] | beam.FlatMap(_summary)
        assert_that(rows, equal_to([("a1", DIM, 1.0), ("b1", DIM, 0.0), ("b2", DIM, 0.0)]))

    # the same shard name with another picture under b2: the stored vectors are stale, not reused
    changed = samples[:3] + [_sample("b2", "s1", _jpeg_bytes(_image(3)))]
    assert _persisted_name(changed, "s1") != s1
    with TestPipeline(runner="DirectRunner") as p:
        out = p | beam.Create(changed) | EmbedClip(cfg, embeddings_dir=str(tmp_path))
        rows = out["embeddings"] | beam.FlatMap(_summary)
        assert_that(rows, equal_to([("a1", DIM, 1.0), ("b1", DIM, 1.0), ("b2", DIM, 1.0)]))


def _persisted_name(samples, shard: str) -> str:
    total = sum(sample_digest(s)[1] for s in samples if s.shard == shard)
    return content_digest((shard, total))[1]
