"""Streaming stages shared by the shard workers: read ahead, decode in parallel, batch by shape.

Each stage is a generator over the previous one with a bounded amount of work in flight,
so memory stays flat however large a shard is, and I/O, image decoding, device work and
entropy coding overlap (the pools release the GIL: PIL's decoders, numba's coder, torch).
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict, deque
from concurrent.futures import Executor
from typing import Callable, Generic, Hashable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_DONE = object()


class _Raised:
    def __init__(self, error: BaseException):
        self.error = error


def read_ahead(items: Iterable[T], depth: int) -> Iterator[T]:
    """Iterate ``items`` on a background thread, at most ``depth`` items ahead."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put(_DONE)
        except BaseException as err:  # forwarded to the consumer, which re-raises it
            buffer.put(_Raised(err))

    thread = threading.Thread(target=produce, name="read-ahead", daemon=True)
    thread.start()
    try:
        while (item := buffer.get()) is not _DONE:
            if isinstance(item, _Raised):
                raise item.error
            yield item
    finally:
        stop.set()


def map_ordered(function: Callable[[T], R], items: Iterable[T], pool: Executor, window: int) -> Iterator[R]:
    """``map`` on a pool, results in input order, at most ``window`` calls in flight."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(function, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


class ShapeBatcher(Generic[T]):
    """Groups items by a shape key into batches of ``batch_size``.

    At most ``max_open`` partial batches are held; adding a new shape beyond that
    flushes the oldest, so mixed-size shards still batch well with bounded memory.
    Decisions depend only on the input order, so output order is deterministic."""

    def __init__(self, batch_size: int, max_open: int = 4):
        self.batch_size = batch_size
        self.max_open = max_open
        self._open: OrderedDict[Hashable, list[T]] = OrderedDict()

    def add(self, shape: Hashable, item: T) -> list[list[T]]:
        ready = []
        if shape not in self._open and len(self._open) >= self.max_open:
            ready.append(self._open.popitem(last=False)[1])
        bucket = self._open.setdefault(shape, [])
        bucket.append(item)
        if len(bucket) >= self.batch_size:
            ready.append(self._open.pop(shape))
        return ready

    def flush(self) -> list[list[T]]:
        ready = list(self._open.values())
        self._open.clear()
        return ready
