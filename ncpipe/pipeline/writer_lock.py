"""One writer per output: a job holds its output's lock while it writes.

The lock is one small JSON object (``<output>/_LOCK``, see ``layout.py``) naming the job, created
exclusively (``storage.create_exclusive``: a hard link locally, a conditional PUT on S3), so of two
jobs started together exactly one gets it; the other is refused at once with a message naming the
running job. The holder refreshes the object's heartbeat every :data:`HEARTBEAT_S` and deletes it
when it ends, however it ends.

A lock whose holder is gone is **stale**: its process no longer exists (same host), or its
heartbeat is older than :data:`STALE_AFTER_S` (another host, or an object store). A stale lock is
replaced by the one job that creates its take-over marker exclusively, so two jobs finding the same
stale lock cannot both replace it.
"""

from __future__ import annotations

import contextvars
import functools
import json
import logging
import os
import socket
import threading
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from typing import Callable, ParamSpec, TypeVar

from ncpipe.errors import NcpipeError
from ncpipe.io.storage import create_exclusive, read_bytes, remove, write_bytes_atomic
from ncpipe.io.urls import redact
from ncpipe.pipeline.layout import takeover_marker

log = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")

HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0  # 20 missed heartbeats: the holder is gone, not slow
_ACQUIRE_ROUNDS = 3  # a lock can vanish (released, taken over) between create and read: try again


class OutputLocked(NcpipeError):
    """Another job is writing this output."""


@dataclass(frozen=True)
class LockOwner:
    """What a lock object holds."""

    job_id: str
    kind: str  # compress, recompress, decompress
    host: str
    pid: int
    started: float  # Unix time
    heartbeat: float  # Unix time of the holder's last refresh

    def describe(self, now: float) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(self.started))
        return (f"{self.kind} job {self.job_id} (pid {self.pid} on {self.host}, started {started}, "
                f"last heartbeat {now - self.heartbeat:.0f}s ago)")

    def is_stale(self, now: float) -> bool:
        if self.host == socket.gethostname() and not _process_exists(self.pid):
            return True
        return now - self.heartbeat > STALE_AFTER_S


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


_held: contextvars.ContextVar[ExitStack | None] = contextvars.ContextVar("ncpipe_writer_locks", default=None)


def releases_locks(job: Callable[P, T]) -> Callable[P, T]:
    """Decorates a job driver: the locks it takes with :func:`lock_output` are released when it returns or raises."""
    @functools.wraps(job)
    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        with ExitStack() as stack:
            token = _held.set(stack)
            try:
                return job(*args, **kwargs)
            finally:
                _held.reset(token)

    return run


def lock_output(url: str, job_id: str, kind: str) -> None:
    """Take the writer lock at ``url`` for the rest of the calling job (see :func:`releases_locks`);
    raises :class:`OutputLocked` naming the job that holds it."""
    stack = _held.get()
    if stack is None:
        raise RuntimeError("lock_output is called from a job decorated with releases_locks")
    stack.enter_context(WriterLock(url, job_id, kind))


class WriterLock:
    """``with WriterLock(url, job_id, kind):`` holds the lock at ``url`` for the block."""

    def __init__(self, url: str, job_id: str, kind: str):
        self.url = url
        self.job_id = job_id
        self.kind = kind
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._started = time.time()

    def __enter__(self) -> "WriterLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _record(self) -> bytes:
        owner = LockOwner(self.job_id, self.kind, socket.gethostname(), os.getpid(), self._started, time.time())
        return json.dumps(asdict(owner)).encode()

    def acquire(self) -> None:
        for _ in range(_ACQUIRE_ROUNDS):
            if create_exclusive(self.url, self._record()):
                break
            owner = read_owner(self.url)
            if owner is None:  # released between our create and our read
                continue
            if owner.job_id == self.job_id:  # a retried create whose first attempt landed
                break
            now = time.time()
            if not owner.is_stale(now):
                raise OutputLocked(
                    f"{redact(self.url.rsplit('/', 1)[0])} is being written by {owner.describe(now)}; "
                    f"wait for it to end (or, if it is gone, remove {redact(self.url)})")
            self._take_over(owner)
        else:
            raise OutputLocked(f"could not take the writer lock {redact(self.url)}: other jobs keep taking it")
        self._heartbeat = threading.Thread(target=self._beat, name="writer-lock", daemon=True)
        self._heartbeat.start()

    def _take_over(self, stale: LockOwner) -> None:
        marker = takeover_marker(self.url, stale.job_id)
        if not create_exclusive(marker, self.job_id.encode()):
            raise OutputLocked(f"another job is taking over the stale lock {redact(self.url)} of job {stale.job_id}")
        try:
            log.warning("taking over the stale writer lock of %s", stale.describe(time.time()))
            remove(self.url)
        finally:
            remove(marker)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                owner = read_owner(self.url)
                if owner is None or owner.job_id != self.job_id:
                    log.error("writer lock %s is no longer this job's (%s)", redact(self.url),
                              "gone" if owner is None else f"held by {owner.job_id}")
                    return
                write_bytes_atomic(self.url, self._record())
            except OSError as err:  # the next beat tries again; STALE_AFTER_S allows many misses
                log.warning("writer lock heartbeat failed: %s", redact(str(err)))

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
        owner = read_owner(self.url)
        if owner is not None and owner.job_id == self.job_id:
            remove(self.url)


def read_owner(url: str) -> LockOwner | None:
    """The lock's holder, or None when there is no lock; an unreadable lock reads as stale."""
    try:
        data = read_bytes(url)
    except FileNotFoundError:
        return None
    try:
        return LockOwner(**json.loads(data))
    except (ValueError, TypeError):  # half a record cannot exist (created whole); this is foreign junk
        return LockOwner("unreadable", "unknown", "", 0, 0.0, 0.0)

