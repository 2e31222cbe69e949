"""Exit statuses of every ncpipe command: one policy, so that a script can trust them.

===  ==================================================================================
0    the job ran to the end and every sample is ``ok``
1    part of the job did not finish (a shard failed; the summary names it): re-run to resume
2    nothing was done: bad arguments, an invalid configuration or spec, or an environment
     error (storage unreachable, credentials missing, a model or device not available)
3    the job ran to the end but some samples are error rows (see the manifest's ``error``),
     or it found no sample at all; ``--allow-errors`` accepts error rows (exit 0)
130  interrupted (Ctrl-C)
===  ==================================================================================
"""

from __future__ import annotations

import argparse

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_SAMPLE_ERRORS = 3
EXIT_INTERRUPTED = 130

ALLOW_ERRORS_HELP = (f"exit 0 even when some samples are error rows (default: exit {EXIT_SAMPLE_ERRORS}; "
                     "a failed shard still exits 1)")


def add_allow_errors(parser: argparse.ArgumentParser) -> None:
    """``--allow-errors``, for every command that runs a job over samples."""
    parser.add_argument("--allow-errors", action="store_true", help=ALLOW_ERRORS_HELP)


def job_exit_status(result: object, allow_errors: bool = False) -> int:
    """The exit status of a job's result (a summary with ``complete``, ``samples`` and ``errors``;
    a result without them, such as a training report, counts as complete and error-free)."""
    if not getattr(result, "complete", True):
        return EXIT_FAILED
    samples = getattr(result, "samples", None)
    errors = getattr(result, "errors", 0)
    if errors and not allow_errors:
        return EXIT_SAMPLE_ERRORS
    if samples == 0:  # an input with no sample in it is a mistake, never a success
        return EXIT_SAMPLE_ERRORS
    return EXIT_OK
