"""Atomic commits and small file operations on any fsspec filesystem.

Nothing is visible under its final name until it is complete:

    local:         <dir>/.<name>.partial-<pid>-<n>  --fsync, os.replace-->  <dir>/<name>
    object store:  <staging>/.<name>.partial-<pid>-<n>  --one put_file-->  s3://bucket/.../<name>

(an S3 object appears only when its PUT or multipart upload completes). Every filesystem call
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
_PARTIAL = re.compile(r"^\..+\.partial-\d+-\d+$")
_MAX_PARTIAL_STEM = 200  # keeps temp names under NAME_MAX (255) on every local filesystem
_partial_numbers = itertools.count()  # unique temp names among this process's threads
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


def _create_partial(directory: str, name: str) -> tuple[str, BinaryIO]:
    """A new temp file ``.<name>.partial-<pid>-<n>``, created exclusively (mode 0o666 & ~umask)."""
    while True:
        temp = os.path.join(directory, f".{name[:_MAX_PARTIAL_STEM]}.partial-{os.getpid()}-{next(_partial_numbers)}")
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


def remove_tree(url: str) -> None:
    """Delete ``url`` and everything below it (nothing if it does not exist); never a bucket itself."""
    fs, path = url_to_fs(url)
    if path.strip("/") == "":
        raise ValueError(f"refusing to remove the filesystem root {redact(url)!r}")
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
    fs, path = url_to_fs(prefix_url)
    fs.invalidate_cache(path)
    try:
        found = retrying(lambda: fs.find(path), "list", prefix_url)
    except FileNotFoundError:
        return []
    keep = [p for p in found if p.endswith(suffix) and not _PARTIAL.match(os.path.basename(p))]
    return sorted(url_for(fs, p, prefix_url) for p in keep)


def remove_partials(dir_url: str) -> int:
    """Delete temps left in a local directory by killed writers; returns how many. No-op on object stores.

    Call it only while no writer is active in that directory (e.g. before a job starts):
    a live writer's temp looks the same.
    """
    fs, path = url_to_fs(dir_url)
    if not is_local(fs) or not os.path.isdir(path):
        return 0
    removed = 0
    for entry in os.scandir(path):
        if entry.is_file(follow_symlinks=False) and _PARTIAL.match(entry.name):
            _unlink_quietly(entry.path)
            removed += 1
    return removed
