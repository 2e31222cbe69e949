"""Progress of long work (jobs, evaluations): done of a known total, images/s, MB/s, elapsed, ETA.

On a terminal (the stream a TTY) one line with a bar is rewritten in place at every report;
otherwise (a log file, a Ray job's log) an INFO log line is written at most every ``interval``
seconds, so that a log of thousands of steps stays readable, plus one when all are done.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import TextIO

log = logging.getLogger(__name__)

BAR_WIDTH = 20
LOG_INTERVAL_S = 5.0
IMAGES = "images"


class Progress:
    """Counts ``done`` of ``total`` (in ``unit``), and optionally images and bytes processed.

    Use as a context manager, so that a terminal line is ended even when the work fails."""

    def __init__(self, total: int, unit: str = IMAGES, label: str = "", stream: TextIO | None = None,
                 interval: float = LOG_INTERVAL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.total = total
        self.unit = unit
        self.label = label
        self.done = 0
        self.images: int | None = None  # images processed, when the unit is not images
        self.nbytes = 0  # bytes processed (0: no MB/s shown)
        self._stream = stream if stream is not None else sys.stderr
        self.terminal = self._stream.isatty()
        self._interval = interval
        self._clock = clock
        self._started = clock()
        self._reported = self._started
        self._line_open = False
        self._ended = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def advance(self, what: str = "", count: int = 1, nbytes: int = 0) -> None:
        """``count`` more done (``what``: a note shown after the line, e.g. the codec at work)."""
        self.done += count
        self.nbytes += nbytes
        self.report(what)

    def update(self, done: int, images: int | None = None, nbytes: int | None = None, force: bool = False) -> None:
        """Set the counts (for work counted elsewhere, such as by workers) and report."""
        self.done = done
        self.images = images if images is not None else self.images
        self.nbytes = nbytes if nbytes is not None else self.nbytes
        self.report(force=force)

    def report(self, what: str = "", force: bool = False) -> None:
        now = self._clock()
        finished = self.done >= self.total
        if self.terminal:
            self._stream.write(f"\r\033[K{self._bar()} {self.line(now, what)}")  # \033[K: clear a longer line
            self._stream.flush()
            self._line_open = True
            if finished:
                self.close()
        elif not self._ended and (force or finished or now - self._reported >= self._interval):
            log.info("%s", self.line(now, what))
            self._reported = now
            self._ended = finished  # the line saying all is done is written once

    def line(self, now: float, what: str = "") -> str:
        """``compress: 3/10 shards (30%), 812 images, 6.2 images/s, 1.43 MB/s, 2:10 elapsed, ETA 5:03``;
        the ETA assumes the mean time per unit so far."""
        elapsed = now - self._started
        parts = [f"{self.done}/{self.total} {self.unit} ({100 * self.done // max(self.total, 1)}%)"]
        images = self.done if self.unit == IMAGES else self.images
        if images is not None and self.unit != IMAGES:
            parts.append(f"{images} {IMAGES}")
        if images is not None and elapsed > 0:
            parts.append(f"{images / elapsed:.1f} {IMAGES}/s")
        if self.nbytes and elapsed > 0:
            parts.append(f"{self.nbytes / 1e6 / elapsed:.2f} MB/s")
        remaining = elapsed / self.done * max(self.total - self.done, 0) if self.done else None
        parts.append(f"{duration(elapsed)} elapsed, ETA {duration(remaining) if remaining is not None else '?'}")
        prefix = f"{self.label}: " if self.label else ""
        return prefix + ", ".join(parts) + (f" ({what})" if what else "")

    def _bar(self) -> str:
        filled = BAR_WIDTH * min(self.done, self.total) // max(self.total, 1)
        return f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}]"

    def close(self) -> None:
        """End the terminal line, so that what is printed next starts a line of its own."""
        if self._line_open:
            self._stream.write("\n")
            self._stream.flush()
            self._line_open = False


def duration(seconds: float) -> str:
    """``h:mm:ss`` or ``m:ss``."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
