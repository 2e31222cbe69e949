"""Builders for tar shards made with the stdlib ``tarfile`` (independent of ncpipe's writer)."""

from __future__ import annotations

import io
import tarfile
from typing import Iterable, Union

Member = Union[tuple[str, bytes], tarfile.TarInfo]


def tar_bytes(members: Iterable[Member], compression: str = "") -> bytes:
    """A tar (``compression``: '', 'gz', 'bz2', 'xz') holding ``members``.

    A ``(name, data)`` pair is a regular file; a ``TarInfo`` is written as given (links, fifos,
    ...). Names may hold surrogate escapes: they are written as the original bytes.
    """
    buffer = io.BytesIO()
    mode = f"w:{compression}" if compression else "w"
    with tarfile.open(fileobj=buffer, mode=mode, format=tarfile.GNU_FORMAT,
                      encoding="utf-8", errors="surrogateescape") as archive:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                archive.addfile(member)
                continue
            name, data = member
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    """A non-regular member header: ``kind`` is tarfile.SYMTYPE, LNKTYPE, FIFOTYPE, CHRTYPE, ..."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def member_offsets(data: bytes) -> list[tuple[str, int, int, int]]:
    """``(name, header_offset, data_offset, size)`` of every member of an uncompressed tar."""
    with tarfile.open(fileobj=io.BytesIO(data), encoding="utf-8", errors="surrogateescape") as archive:
        return [(m.name, m.offset, m.offset_data, m.size) for m in archive.getmembers()]


def put_bytes(url: str, data: bytes) -> None:
    """Store ``data`` at ``url`` (local or S3) with plain fsspec, creating local parents."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(fs._parent(path), exist_ok=True)
    fs.pipe_file(path, data)
