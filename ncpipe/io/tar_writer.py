"""Deterministic tar output: the same members in the same order give byte-identical shards.

Every header is fixed except name and size (mtime 0, uid/gid 0, no user/group names,
mode 0o644, regular file). The format is POSIX pax, so long and non-ASCII names survive;
a name holding surrogate escapes (read from a non-UTF-8 tar) is written back as its original
bytes (pax ``hdrcharset=BINARY``).
"""

from __future__ import annotations

import io
import tarfile
from types import TracebackType
from typing import BinaryIO

_WRITE_CHUNK = 2**20


class TarShardWriter:
    """Appends regular-file members to a tar stream over ``fileobj`` (which it never closes)."""

    def __init__(self, fileobj: BinaryIO):
        self._tar = tarfile.open(
            fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT, bufsize=_WRITE_CHUNK,
            encoding="utf-8", errors="surrogateescape",
        )
        self._closed = False

    def add(self, name: str, data: bytes) -> None:
        """Append the member ``name`` holding ``data``."""
        if self._closed:
            raise ValueError("TarShardWriter is closed")
        self._tar.addfile(_header(name, len(data)), io.BytesIO(data))

    def close(self) -> None:
        """Write the end-of-archive marker and flush (the file object stays open)."""
        if not self._closed:
            self._closed = True
            self._tar.close()

    def __enter__(self) -> "TarShardWriter":
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:  # no end marker after a failure: the output is discarded, and must not look complete
            self._closed = True


def _header(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info
