"""Atomic commits and small file operations on any fsspec filesystem.

Nothing is visible under its final name until it is complete:

    local:         <dir>/.<name>.partial-[<job>-]<pid>-<n>  --fsync, os.replace-->  <dir>/<name>
    object store:  <staging>/.<name>.partial-[<job>-]<pid>-<n>  --one put_file-->  s3://bucket/.../<name>

(an S3 object appears only when its PUT or multipart upload completes). A temp carries the id of
the job it was written for (inside ``job_temporaries``), so a job's cleanup removes its own temps
and nobody else's. ``create_exclusive`` writes an object only where none exists (a local hard
link, an S3 conditional PUT): the primitive of the writer lock. Every filesystem call
goes through ``retrying``: retried only for the errors ``is_transient`` accepts (the one list),
and re-raised as an ``OSError`` whose message went through ``redact``.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from typing import BinaryIO, Callable, Iterator, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ncpipe.io.failures import StorageError, classify
from ncpipe.io.urls import redact, url_for, url_to_fs

log = logging.getLogger(__name__)

T = TypeVar("T")

ATTEMPTS = 3
BACKOFF_S = 0.5  # then 1 s: bounded, the filesystem client has already retried on its own
TRANSIENT_ERROR_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "TooManyRequests", "RequestLimitExceeded",
    "RequestTimeout", "InternalError", "ServiceUnavailable", "500", "502", "503", "504",
})
_PARTIAL = re.compile(r"^\..+\.partial-(?:(?P<job>\d{8}T\d{6}Z-[0-9a-f]+)-)?\d+-\d+$")
_MAX_PARTIAL_STEM = 200  # keeps temp names under NAME_MAX (255) on every local filesystem
_partial_numbers = itertools.count()  # unique temp names among this process's threads
_temporaries_job: list[str] = []  # the job whose temps this process writes now (job_temporaries)
_KEPT_ERROR_TYPES = (
    FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError,
    TimeoutError, ConnectionError,
)


@functools.cache
def transient_error_types() -> tuple[type[BaseException], ...]:
    """Exception types worth retrying: connection failures and timeouts, from any client layer."""
    from aiohttp import ClientConnectionError, ClientPayloadError  # imported late: only object stores need them
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError

    return (ConnectionError, TimeoutError, BotoConnectionError, HTTPClientError, ClientConnectionError,
            ClientPayloadError)


def is_transient(err: BaseException) -> bool:
    """Whether ``err``, or an explicit cause of it, is a connection error, timeout, 5xx or throttling."""
    current: BaseException | None = err
    for _ in range(8):  # s3fs wraps a botocore ClientError as the __cause__ of an OSError
        if current is None:
            return False
        if isinstance(current, transient_error_types()) or _transient_response(current):
            return True
        current = current.__cause__
    return False


def _transient_response(err: BaseException) -> bool:
    response = getattr(err, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        code = str(response.get("Error", {}).get("Code", ""))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return code in TRANSIENT_ERROR_CODES or _transient_status(status)
    return _transient_status(getattr(err, "status", None))  # aiohttp ClientResponseError


def _transient_status(status: object) -> bool:
    return isinstance(status, int) and (status >= 500 or status == 429)


def retrying(call: Callable[[], T], what: str, url: str, sleep: Callable[[float], None] = time.sleep) -> T:
    """``call()``, retried with backoff on transient errors; failures re-raised redacted."""
    for attempt in range(ATTEMPTS):
        try:
            return call()
        except Exception as err:
            if attempt + 1 < ATTEMPTS and is_transient(err):
                log.warning("%s", redact(f"{what} {url}: {type(err).__name__}: {err}; retrying"))
                sleep(BACKOFF_S * 2**attempt)
                continue
            raise redacted_error(err, f"cannot {what} {url}") from None
    raise AssertionError("unreachable")


def redacted_error(err: BaseException, context: str) -> OSError:
    """An ``OSError`` saying ``context: err``, redacted: a named storage failure (unreachable, credentials,
    access denied, no such bucket) when ``err`` is one, else of ``err``'s builtin kind where it has one."""
    named = classify(err, redact(context))
    if named is not None:
        return named
    kind = next((t for t in _KEPT_ERROR_TYPES if isinstance(err, t)), StorageError)
    return kind(redact(f"{context}: {type(err).__name__}: {err}"))


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is the local filesystem (rename is atomic there)."""
    return isinstance(fs, LocalFileSystem)


@contextmanager
def atomic_writer(url: str, staging_dir: str | None = None) -> Iterator[BinaryIO]:
    """A local binary file whose content appears under ``url`` only on a clean exit, all at once."""
    fs, path = url_to_fs(url)
    if is_local(fs):
        with _local_atomic(path) as handle:
            yield handle
    else:
        with _staged_upload(fs, path, url, staging_dir or tempfile.gettempdir()) as handle:
            yield handle


@contextmanager
def _local_atomic(path: str) -> Iterator[BinaryIO]:
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    temp, handle = _create_partial(directory, name)
    try:
        with handle:
            yield handle
            _flush_to_disk(handle, temp)
        os.replace(temp, path)
    except BaseException:
        _unlink_quietly(temp)
        raise
    _fsync_directory(directory)


@contextmanager
def _staged_upload(fs: fsspec.AbstractFileSystem, path: str, url: str, staging_dir: str) -> Iterator[BinaryIO]:
    os.makedirs(staging_dir, exist_ok=True)
    temp, handle = _create_partial(staging_dir, os.path.basename(path))
    try:
        with handle:
            yield handle
        retrying(lambda: fs.put_file(temp, path), "upload", url)
    finally:
        _unlink_quietly(temp)


@contextmanager
def job_temporaries(job_id: str) -> Iterator[None]:
    """Temps written inside this block (by any thread of this process) carry ``job_id`` in their name.

    Process-wide, not per thread: a shard worker writes from its pools' threads too, and a worker
    process runs one job's shard at a time."""
    _temporaries_job.append(job_id)
    try:
        yield
    finally:
        _temporaries_job.pop()


def _create_partial(directory: str, name: str) -> tuple[str, BinaryIO]:
    """A new temp file ``.<name>.partial-[<job>-]<pid>-<n>``, created exclusively (mode 0o666 & ~umask)."""
    job = f"{_temporaries_job[-1]}-" if _temporaries_job else ""
    while True:
        temp = os.path.join(directory,
                            f".{name[:_MAX_PARTIAL_STEM]}.partial-{job}{os.getpid()}-{next(_partial_numbers)}")
        try:
            return temp, open(temp, "xb")
        except FileExistsError:  # left by a killed process that had the same pid
            continue


def _flush_to_disk(handle: BinaryIO, path: str) -> None:
    if not handle.closed:
        handle.flush()
        os.fsync(handle.fileno())
        return
    fd = os.open(path, os.O_RDONLY)  # a writer that closes its sink (some do) has flushed Python's buffer
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(directory: str) -> None:
    """Make the rename itself durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write ``data`` to ``url``: visible whole or not at all."""
    fs, path = url_to_fs(url)
    if is_local(fs):
        with _local_atomic(path) as handle:
            handle.write(data)
    else:  # one PUT: the object appears only once it is complete
        retrying(lambda: fs.pipe_file(path, data), "write", url)


def create_exclusive(url: str, data: bytes) -> bool:
    """Write ``data`` to ``url`` whole, only if nothing exists there; False when something does.

    Local: the content is written to a temp, then hard-linked to the name (``link`` fails on an
    existing name, so exactly one of several racing writers wins and no reader sees half a file).
    S3: a PUT with ``If-None-Match: *``, which the store refuses (412) when the key exists. A
    retried PUT whose first attempt did land also reads as False: the caller re-reads the object."""
    fs, path = url_to_fs(url)
    if is_local(fs):
        return _link_exclusive(path, data)
    try:
        retrying(lambda: fs.pipe_file(path, data, mode="create"), "create", url)
    except FileExistsError:
        return False
    return True


def _link_exclusive(path: str, data: bytes) -> bool:
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    temp, handle = _create_partial(directory, name)
    try:
        with handle:
            handle.write(data)
            _flush_to_disk(handle, temp)
        try:
            os.link(temp, path)
        except FileExistsError:
            return False
    finally:
        _unlink_quietly(temp)
    _fsync_directory(directory)
    return True


def read_bytes(url: str) -> bytes:
    """The whole content of ``url``."""
    fs, path = url_to_fs(url)
    return retrying(lambda: fs.cat_file(path), "read", url)


def exists(url: str) -> bool:
    """Whether ``url`` exists now (listing caches are bypassed: other processes write too)."""
    fs, path = url_to_fs(url)
    fs.invalidate_cache(path)
    return retrying(lambda: fs.exists(path), "check", url)


def size_of(url: str) -> int:
    """Size of the file at ``url`` in bytes."""
    fs, path = url_to_fs(url)
    fs.invalidate_cache(path)
    return int(retrying(lambda: fs.size(path), "stat", url))


def remove(url: str, missing_ok: bool = True) -> None:
    """Delete the file at ``url``; a missing file is an error only if ``missing_ok`` is false."""
    fs, path = url_to_fs(url)
    if not missing_ok and not exists(url):  # an S3 DELETE of a missing key succeeds silently
        raise FileNotFoundError(redact(f"cannot remove {url}: it does not exist"))
    try:
        retrying(lambda: fs.rm_file(path), "remove", url)
    except FileNotFoundError:
        if not missing_ok:
            raise


def remove_tree(url: str, keep: tuple[str, ...] = ()) -> None:
    """Delete ``url`` and everything below it (nothing if it does not exist); never a bucket itself.
    ``keep``: URLs of files directly below ``url`` that stay (a writer lock)."""
    fs, path = url_to_fs(url)
    if path.strip("/") == "":
        raise ValueError(f"refusing to remove the filesystem root {redact(url)!r}")
    if keep:
        kept = {url_to_fs(k)[1].rstrip("/") for k in keep}
        fs.invalidate_cache(path)
        entries = retrying(lambda: fs.ls(path, detail=False), "list", url) if fs.isdir(path) else []
        for entry in entries:
            if entry.rstrip("/") not in kept:
                remove_tree(url_for(fs, entry, url))
        return
    if is_local(fs):
        if os.path.isdir(path) and not os.path.islink(path):
            retrying(lambda: shutil.rmtree(path), "remove", url)
        else:
            retrying(lambda: _unlink_quietly(path), "remove", url)
        return
    fs.invalidate_cache(path)
    files = retrying(lambda: fs.find(path), "list", url)
    if files:  # files only: a recursive rm of a bucket path would delete the bucket
        retrying(lambda: fs.rm(files), "remove", url)


def list_files(prefix_url: str, suffix: str = "") -> list[str]:
    """URLs of the files below ``prefix_url`` (recursively) ending with ``suffix``, sorted; temps excluded."""
    return sorted(file_sizes(prefix_url, suffix))


def file_sizes(prefix_url: str, suffix: str = "") -> dict[str, int]:
    """URL -> size in bytes of the files below ``prefix_url`` ending with ``suffix``, from one listing (not
    a request per file: a job's summary of thousands of shards on object storage); temps excluded."""
    fs, path = url_to_fs(prefix_url)
    fs.invalidate_cache(path)
    try:
        found = retrying(lambda: fs.find(path, detail=True), "list", prefix_url)
    except FileNotFoundError:
        return {}
    return {url_for(fs, p, prefix_url): int(info.get("size") or 0) for p, info in found.items()
            if p.endswith(suffix) and not _PARTIAL.match(os.path.basename(p))}


def remove_partials(dir_url: str, job_id: str | None = None) -> int:
    """Delete temps left in a local directory by killed writers: those of job ``job_id``, or every
    one when it is None; returns how many. No-op on object stores.

    Without ``job_id``, call it only while no writer is active in that directory (holding the
    output's writer lock): a live writer's temp looks the same.
    """
    fs, path = url_to_fs(dir_url)
    if not is_local(fs) or not os.path.isdir(path):
        return 0
    removed = 0
    for entry in os.scandir(path):
        match = _PARTIAL.match(entry.name) if entry.is_file(follow_symlinks=False) else None
        if match and (job_id is None or match["job"] == job_id):
            _unlink_quietly(entry.path)
            removed += 1
    return removed
