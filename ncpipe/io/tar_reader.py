"""Streaming samples out of a tar shard (plain or compressed), never unpacking to disk.

    fsspec file --tarfile "r|*"--> members --group consecutive equal keys--> Sample, Sample, ...

A sample's key is a member's path up to the first '.' of its basename (webdataset
semantics). Bad input never raises mid-shard: the affected sample comes out with ``error``
set. Only a shard that cannot be opened or is not a tar raises ``ShardUnreadable``; an I/O
failure of the storage while reading raises (redacted) so the shard can be retried.
"""

from __future__ import annotations

import posixpath
import re
import tarfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator

from ncpipe.errors import NcpipeError
from ncpipe.io.storage import is_transient, redacted_error
from ncpipe.io.urls import redact, url_to_fs

DEFAULT_MAX_MEMBER_BYTES = 256 * 2**20
_MAX_EXTENDED_HEADER_BYTES = 2**20  # PAX / GNU long-name headers are read whole by tarfile
_READ_CHUNK = 256 * 2**10  # tarfile copies a few chunks per read: this bounds memory while skipping
_EXTENDED_HEADER_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                          tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class TarMember:
    """One file of a sample, its name exactly as stored (non-UTF-8 bytes kept as surrogate escapes)."""

    name: str
    data: bytes = field(repr=False)

    @property
    def extension(self) -> str:
        """Everything after the first '.' of the basename, lowercased: 'jpg', 'seg.png' ('' if none)."""
        return _split_name(self.name)[1].lower()


@dataclass(frozen=True)
class Sample:
    """Consecutive members sharing a key; ``error`` says why the sample is not clean (None if it is)."""

    key: str
    members: tuple[TarMember, ...]
    source_url: str
    index: int
    error: str | None = None
    cut: str | None = None  # the archive broke right after this sample's last member (also in ``error``)

    @property
    def members_intact(self) -> bool:
        """Every member was read whole and nothing else is wrong; when the archive broke right after
        them (``cut``), members that followed are lost, which only a list of the sample's members
        (a manifest) can rule out."""
        return self.error is None or self.error == self.cut


class ShardUnreadable(NcpipeError):
    """The shard cannot be opened or read at all (missing, not a tar); the message names its redacted URL."""


class _BrokenArchive(Exception):
    """A header that is missing, truncated, invalid or oversized after the first member."""


class _StorageFailure(Exception):
    """The underlying file failed to read; carries the original error past tarfile."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


# What tarfile and the decompressors raise on bad bytes (storage failures come as _StorageFailure).
_FORMAT_ERRORS = (tarfile.TarError, _BrokenArchive, EOFError, ValueError, IndexError, TypeError, zlib.error)


@dataclass
class _Entry:
    """A member as read (``data`` None: not kept), or with ``fatal`` the point where the archive broke."""

    name: str | None
    data: bytes | None
    error: str | None = None
    fatal: bool = False


def iter_samples(url: str, *, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> Iterator[Sample]:
    """The samples of the shard at ``url`` in archive order; see the module docstring for errors."""
    try:
        with _open_source(url) as source, _open_tar(source, url) as archive:
            yield from _group(_entries(archive, max_member_bytes), url)
    except _StorageFailure as failure:
        raise redacted_error(failure.error, f"cannot read shard {url}") from None


def _split_name(name: str) -> tuple[str, str]:
    directory, base = posixpath.split(name)
    stem, _, extension = base.partition(".")
    return posixpath.join(directory, stem) if directory else stem, extension


def _shown(name: str) -> str:
    """``name`` quoted and printable: undecodable bytes as \\xNN, control characters escaped."""
    text = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "'" + _CONTROL_CHARS.sub(lambda m: f"\\x{ord(m[0]):02x}", text) + "'"


class _SourceReader:
    """Read-only view of the storage file that marks its own failures, so tarfile's cannot pass for them."""

    def __init__(self, handle: BinaryIO):
        self.handle = handle

    def read(self, size: int = -1) -> bytes:
        try:
            return self.handle.read(size)
        except Exception as err:  # whatever the storage client raises is a storage failure
            raise _StorageFailure(err) from err


class _BoundedTarInfo(tarfile.TarInfo):
    """TarInfo that refuses oversized extended headers and reports a bad header instead of stopping."""

    @classmethod
    def fromtarfile(cls, archive: tarfile.TarFile) -> tarfile.TarInfo:
        # tarfile ends the archive silently at a missing or invalid header after the first one;
        # for a shard that means samples lost without a word, so it becomes an error here.
        try:
            return super().fromtarfile(archive)
        except tarfile.EOFHeaderError:
            raise  # a zero block: the regular end of the archive
        except tarfile.HeaderError as err:
            if archive.offset == 0:
                raise  # tarfile's own "empty file" / "bad checksum": not a tar at all
            if isinstance(err, tarfile.EmptyHeaderError):
                raise _BrokenArchive("the archive ends without an end-of-archive marker") from None
            raise _BrokenArchive(f"bad header at byte {archive.offset}: {err}") from None

    def _proc_member(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _EXTENDED_HEADER_TYPES and self.size > _MAX_EXTENDED_HEADER_BYTES:
            raise _BrokenArchive(f"extended header of {self.size} bytes at byte {self.offset}")
        return super()._proc_member(archive)


@contextmanager
def _open_source(url: str) -> Iterator[_SourceReader]:
    """The storage file, or ``ShardUnreadable``; transient errors propagate so the shard can be retried."""
    try:
        fs, path = url_to_fs(url)
        handle = fs.open(path, "rb")
    except Exception as err:  # whatever stops the open is about this shard, not the caller
        if is_transient(err):
            raise redacted_error(err, f"cannot open shard {url}") from None
        raise ShardUnreadable(redact(f"cannot open shard {url}: {type(err).__name__}: {err}")) from None
    with handle:
        yield _SourceReader(handle)


@contextmanager
def _open_tar(source: _SourceReader, url: str) -> Iterator[tarfile.TarFile]:
    """A streaming ``TarFile`` over ``source`` (any compression tarfile detects), or ``ShardUnreadable``."""
    try:
        archive = tarfile.open(
            fileobj=source, mode="r|*", bufsize=_READ_CHUNK, tarinfo=_BoundedTarInfo,
            encoding="utf-8", errors="surrogateescape",
        )
    except _FORMAT_ERRORS as err:
        raise ShardUnreadable(redact(f"shard {url} is not a readable tar: {err}")) from None
    with archive:
        yield archive


def _entries(archive: tarfile.TarFile, max_member_bytes: int) -> Iterator[_Entry]:
    """Members in archive order (directories skipped), then a fatal entry if the archive breaks."""
    previous = None
    try:
        while (info := archive.next()) is not None:
            archive.members.clear()  # tarfile keeps every header it read; a shard can have millions
            if info.isdir():
                continue
            try:
                entry = _read_member(archive, info, max_member_bytes)
            except _FORMAT_ERRORS as err:
                yield _Entry(info.name, None, f"truncated or corrupt tar: member {_shown(info.name)}: {err}", True)
                return
            previous = info.name
            yield entry
    except _FORMAT_ERRORS as err:
        where = f" after member {_shown(previous)}" if previous is not None else ""
        yield _Entry(None, None, f"truncated or corrupt tar{where}: {err}", True)


def _read_member(archive: tarfile.TarFile, info: tarfile.TarInfo, max_member_bytes: int) -> _Entry:
    if info.type not in _FILE_TYPES:
        return _Entry(info.name, None, f"unsupported tar member type {info.type!r} ({_shown(info.name)})")
    if info.size > max_member_bytes:
        return _Entry(info.name, None, f"member {_shown(info.name)} is {info.size} bytes, over the limit of "
                                       f"{max_member_bytes} (not read)")
    data = archive.extractfile(info).read()
    return _Entry(info.name, data, "; ".join(_name_problems(info.name)) or None)


def _name_problems(name: str) -> list[str]:
    problems = []
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        problems.append(f"member name is not UTF-8: {_shown(name)}")
    if not name or name.startswith("/") or ".." in name.split("/"):
        problems.append(f"unsafe member name {_shown(name)}")
    return problems


class _SampleBuilder:
    """Accumulates one sample's members and problems."""

    def __init__(self, key: str, duplicate: bool = False):
        self.key = key
        self.members: list[TarMember] = []
        self.errors = [f"duplicate key {_shown(key)} (it appeared earlier in the shard)"] if duplicate else []
        self.cut: str | None = None

    def add(self, entry: _Entry) -> None:
        if entry.fatal and entry.name is None and self.members:
            self.cut = entry.error  # the archive broke between members, after this sample's last one
        if entry.data is not None:
            if any(member.name == entry.name for member in self.members):
                self.errors.append(f"member {_shown(entry.name)} appears twice in the sample")
            self.members.append(TarMember(entry.name, entry.data))
        if entry.error:
            self.errors.append(entry.error)

    def build(self, url: str, index: int) -> Sample:
        return Sample(self.key, tuple(self.members), url, index, "; ".join(self.errors) or None, self.cut)


def _group(entries: Iterator[_Entry], url: str) -> Iterator[Sample]:
    """Consecutive entries with one key make a sample; a key seen before in the shard is an error.

    Where the archive breaks, the sample in progress gets the error and the shard ends.
    """
    seen: set[str] = set()
    current: _SampleBuilder | None = None
    index = 0
    for entry in entries:
        key = _split_name(entry.name)[0] if entry.name is not None else None
        if key is not None and (current is None or key != current.key):
            if current is not None:
                yield current.build(url, index)
                index += 1
            current = _SampleBuilder(key, duplicate=key in seen)
            seen.add(key)
        current = current or _SampleBuilder("")
        current.add(entry)
        if entry.fatal:
            break
    if current is not None:
        yield current.build(url, index)
