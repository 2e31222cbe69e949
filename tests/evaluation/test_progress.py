"""Progress reports: an updating line on a terminal, rate-limited log lines elsewhere."""

from __future__ import annotations

import io
import logging

from ncpipe.evaluation.progress import Progress


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_lines_are_rate_limited_and_the_last_one_is_always_written(caplog):
    caplog.set_level(logging.INFO, logger="ncpipe.evaluation.progress")
    clock, stream = _Clock(), io.StringIO()
    with Progress(4, stream=stream, interval=5.0, clock=clock) as progress:
        for seconds in (1.0, 6.0, 7.0, 8.0):
            clock.now = seconds
            progress.advance("m q1")
    assert caplog.messages == [
        "2/4 images (50%), 0:06 elapsed, ETA 0:06 (m q1)",  # 1/4 came within 5 s, 3/4 within 5 s of 2/4
        "4/4 images (100%), 0:08 elapsed, ETA 0:00 (m q1)",
    ]
    assert stream.getvalue() == ""


def test_a_terminal_gets_one_updating_line_ended_by_a_newline():
    clock, stream = _Clock(), _Terminal()
    with Progress(2, stream=stream, clock=clock) as progress:
        clock.now = 30.0
        progress.advance("jpeg")
        assert stream.getvalue() == "\r\033[K1/2 images (50%), 0:30 elapsed, ETA 0:30 (jpeg)"
        clock.now = 3700.0
        progress.advance()
    assert stream.getvalue().endswith("\r\033[K2/2 images (100%), 1:01:40 elapsed, ETA 0:00\n")


def test_a_run_that_fails_midway_ends_the_terminal_line():
    stream = _Terminal()
    try:
        with Progress(3, stream=stream) as progress:
            progress.advance()
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert stream.getvalue().endswith("\n") and stream.getvalue().count("\n") == 1
