"""Progress reports (jobs and evaluations alike): an updating bar on a terminal, rate-limited log lines
elsewhere, with percent, images/s, MB/s and ETA."""

from __future__ import annotations

import io
import logging

from ncpipe.progress import Progress


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_lines_are_rate_limited_and_the_last_one_is_always_written(caplog):
    caplog.set_level(logging.INFO, logger="ncpipe.progress")
    clock, stream = _Clock(), io.StringIO()
    with Progress(4, stream=stream, interval=5.0, clock=clock) as progress:
        for seconds in (1.0, 6.0, 7.0, 8.0):
            clock.now = seconds
            progress.advance("m q1")
    assert caplog.messages == [
        "2/4 images (50%), 0.3 images/s, 0:06 elapsed, ETA 0:06 (m q1)",  # 1/4 within 5 s, 3/4 within 5 s of 2/4
        "4/4 images (100%), 0.5 images/s, 0:08 elapsed, ETA 0:00 (m q1)",
    ]
    assert stream.getvalue() == ""


def test_a_terminal_gets_one_updating_line_ended_by_a_newline():
    clock, stream = _Clock(), _Terminal()
    with Progress(2, stream=stream, clock=clock) as progress:
        clock.now = 30.0
        progress.advance("jpeg")
        assert stream.getvalue() == ("\r\033[K[##########..........] 1/2 images (50%), 0.0 images/s, 0:30 elapsed, "
                                     "ETA 0:30 (jpeg)")
        clock.now = 3700.0
        progress.advance()
    assert stream.getvalue().endswith("\r\033[K[####################] 2/2 images (100%), 0.0 images/s, 1:01:40 "
                                      "elapsed, ETA 0:00\n")


def test_a_run_that_fails_midway_ends_the_terminal_line():
    stream = _Terminal()
    try:
        with Progress(3, stream=stream) as progress:
            progress.advance()
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert stream.getvalue().endswith("\n") and stream.getvalue().count("\n") == 1


def test_a_job_reports_shards_images_and_bytes(caplog):
    caplog.set_level(logging.INFO, logger="ncpipe.progress")
    clock = _Clock()
    with Progress(10, unit="shards", label="compress", stream=io.StringIO(), clock=clock) as progress:
        clock.now = 2.0
        progress.update(0, images=0)  # nothing finished yet: no ETA to give
        clock.now = 130.0
        progress.update(3, images=812, nbytes=186_000_000, force=True)
    assert caplog.messages == [
        "compress: 3/10 shards (30%), 812 images, 6.2 images/s, 1.43 MB/s, 2:10 elapsed, ETA 5:03",
    ]
    assert "ETA ?" in Progress(1, stream=io.StringIO(), clock=clock).line(clock.now + 1)  # none done yet


def test_the_line_saying_all_is_done_is_logged_once(caplog):
    caplog.set_level(logging.INFO, logger="ncpipe.progress")
    with Progress(2, unit="shards", stream=io.StringIO(), clock=_Clock()) as progress:
        progress.update(2, images=5)
        progress.update(2, images=5, force=True)  # the distributor's closing report
    assert len(caplog.messages) == 1
