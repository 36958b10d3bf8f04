"""Build small webdataset shards (and img2dataset sidecars) for tests."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np


def jpeg_bytes(seed: int = 0, size=(64, 48), quality: int = 90) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = (rng.random((size[1] // 8, size[0] // 8, 3)) * 255).astype("uint8")
    img = Image.fromarray(arr).resize(size, Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png_bytes(seed: int = 0, size=(40, 30)) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8"))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: str, samples: list[tuple[str, dict[str, bytes]]]) -> str:
    """samples: [(key, {ext: bytes})]; members are written in order."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                add_member(tar, f"{key}.{ext}", data)
    return path


def sample(
    key: str, caption: str | bytes = "a caption", image: bytes | None = None, ext: str = "jpg", meta: dict | None = None
) -> tuple[str, dict[str, bytes]]:
    members: dict[str, bytes] = {ext: image if image is not None else jpeg_bytes(hash(key) % 1000)}
    if caption is not None:
        members["txt"] = caption if isinstance(caption, bytes) else caption.encode()
    members["json"] = json.dumps(dict(meta or {}, key=key, url=f"http://example.invalid/{key}.{ext}")).encode()
    return key, members


def write_sidecar(path: str, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
