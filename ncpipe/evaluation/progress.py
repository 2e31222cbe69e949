"""Progress of a long measurement: images done of a known total, elapsed time and ETA.

On a terminal (stderr a TTY) one line is rewritten in place after every image; otherwise
(a log file, a Ray job's log) an INFO log line is written at most every ``interval``
seconds, so that a log of thousands of images stays readable, plus one when all are done.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import TextIO

log = logging.getLogger(__name__)


class Progress:
    """Call :meth:`advance` once per image; use as a context manager so a terminal line is ended."""

    def __init__(self, total: int, stream: TextIO | None = None, interval: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total = total
        self.done = 0
        self._stream = stream if stream is not None else sys.stderr
        self._terminal = self._stream.isatty()
        self._interval = interval
        self._clock = clock
        self._started = clock()
        self._reported = self._started
        self._line_open = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._end_line()  # after a failure mid-run, so that its error message starts a line of its own

    def advance(self, what: str = "") -> None:
        """One more image done (``what``: the codec and rate point it was coded by)."""
        self.done += 1
        now = self._clock()
        finished = self.done >= self.total
        if self._terminal:
            self._stream.write(f"\r\033[K{self._line(now, what)}")  # \033[K: clear a longer previous line
            self._stream.flush()
            self._line_open = True
            if finished:
                self._end_line()
        elif finished or now - self._reported >= self._interval:
            log.info("%s", self._line(now, what))
            self._reported = now

    def _line(self, now: float, what: str) -> str:
        """``12/48 images (25%), 0:31 elapsed, ETA 1:33 (what)``; the ETA assumes the mean time per image so far."""
        elapsed = now - self._started
        remaining = elapsed / self.done * max(self.total - self.done, 0)
        percent = 100 * self.done // max(self.total, 1)
        suffix = f" ({what})" if what else ""
        return (f"{self.done}/{self.total} images ({percent}%), {_duration(elapsed)} elapsed, "
                f"ETA {_duration(remaining)}{suffix}")

    def _end_line(self) -> None:
        if self._line_open:
            self._stream.write("\n")
            self._stream.flush()
            self._line_open = False


def _duration(seconds: float) -> str:
    """``h:mm:ss`` or ``m:ss``."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
