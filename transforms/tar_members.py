"""Members of a tar stream, with the damage tarfile would hide made visible.

``tarfile`` in stream mode ends quietly on a tar cut on a block boundary, inside a header, or
at a garbage header after the first member; here each of those raises ``ReadError`` after the
members before it, so the reader marks the shard truncated. A member cut inside its data is
yielded with a ``truncated_member`` error before the error ends the shard. Links are never
followed; members no stage reads are named but not held in memory.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator


class _Markers(tarfile.TarInfo):
    """Records how the member list ended: tarfile treats a missing end-of-archive block, a header
    cut short or a garbage header after the first member as a normal end; memsieve does not."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            raise  # a zero block: the archive's end marker
        except tarfile.HeaderError as exc:
            tar.memsieve_end = f"{type(exc).__name__}: {exc}"
            raise


def iter_members(fileobj, limits) -> Iterator[tuple[str, bytes | None, str]]:
    """Yield (name, data, error) per member; data None with an error for bad members.

    A member cut inside its data is yielded with ``truncated_member`` before the read error
    ends the shard, so its key (its header was read) reaches the manifest."""
    from transforms.read_shards import _TEXT_EXTENSIONS, UNSUPPORTED_IMAGE_EXTENSIONS, printable, split_member_name

    keep = set(limits.image_extensions) | set(UNSUPPORTED_IMAGE_EXTENSIONS) | set(_TEXT_EXTENSIONS)
    with tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_Markers) as tar:
        for info in tar:
            tar.members = []  # stream mode keeps every header otherwise
            if info.issym() or info.islnk():  # never followed: a link could point outside the shard
                kind = "symlink" if info.issym() else "hard link"
                yield info.name, None, f"link_member: a {kind} to {printable(info.linkname)[:200]}"
                continue
            if not info.isfile():  # directories, devices, fifos: not part of any sample
                yield info.name, None, "not_a_file"
                continue
            if info.size > limits.max_member_bytes:
                yield info.name, None, f"member_too_large: {info.size} bytes, the limit is {limits.max_member_bytes}"
                continue
            split = split_member_name(info.name)
            if split is not None and split[1] not in keep:
                yield info.name, b"", ""  # a member no stage reads: named, not held in memory
                continue
            try:
                handle = tar.extractfile(info)
                data = handle.read() if handle else b""
            except Exception as exc:
                yield info.name, None, f"truncated_member: cut inside its data ({type(exc).__name__}: {exc})"
                raise
            yield info.name, data, ""
        end = getattr(tar, "memsieve_end", "")
        if end:
            raise tarfile.ReadError(f"the member list ends without the end-of-archive blocks ({end})")
