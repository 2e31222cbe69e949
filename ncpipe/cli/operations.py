"""CLI subcommands of this package (registered by ncpipe.cli): ``run``, ``submit`` and ``job``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import ncpipe
from ncpipe.cli.exit_status import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, add_allow_errors, job_exit_status
from ncpipe.io.urls import redact
from ncpipe.operations.jobspec import JOB_KINDS

log = logging.getLogger(__name__)

_ACTIVE_STATES = ("PENDING", "RUNNING")


def register(subparsers) -> None:
    """Add ``run``, ``submit`` and ``job {status,logs,stop}``."""
    _add_run(subparsers)
    _add_submit(subparsers)
    _add_job(subparsers)


def _add_run(sub) -> None:
    p = sub.add_parser(
        "run", help="run a job spec (YAML: kind + spec [+ cluster]) here or, inside a submitted job, on its cluster",
        description="Load SPEC (kind: one of " + ", ".join(sorted(JOB_KINDS)) + "; spec: the fields of that "
        "kind's configuration; optional cluster: Ray settings), validate every field, and run it. Relative "
        "paths in the spec are relative to the current directory. Exit status 0 when the job completed with "
        "every sample ok, 1 when some of it failed, 2 when the spec is invalid, 3 when some samples are error "
        "rows (see --allow-errors).",
    )
    p.add_argument("spec", help="job spec file (YAML)")
    p.add_argument("--check", action="store_true", help="validate and print the configuration, run nothing")
    _add_output(p)
    add_allow_errors(p)
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from ncpipe.operations.jobspec import load_spec, with_output

    spec = with_output(load_spec(args.spec), args.output)
    log.info("ncpipe %s from %s: %s job %s", ncpipe.__version__, Path(ncpipe.__file__).parent, spec.kind, spec.path)
    if args.check:
        print(redact(json.dumps({"kind": spec.kind, "spec": dataclasses.asdict(spec.config)}, indent=2, default=str)))
        return EXIT_OK
    result = spec.run_function()(spec.config)
    if callable(getattr(result, "text", None)):
        print(result.text())
    return job_exit_status(result, args.allow_errors)


def _add_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", help="write here instead of the spec's output (a URL, or a path)")


def _add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="the head's dashboard URL, http://HEAD:8265 (default: "
                        "$RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS); with token auth, Ray's RAY_AUTH_MODE=token "
                        "and RAY_AUTH_TOKEN (or ~/.ray/auth_token) supply the token")


def _add_submit(sub) -> None:
    p = sub.add_parser(
        "submit", help="run a job spec on a Ray cluster (Ray Jobs API): upload the working dir, follow the job",
        description="Validate SPEC here, upload --working-dir (without .git, .venv, out, runs, caches and what "
        ".gitignore names) and run `python -m ncpipe run SPEC` on the cluster's head in that copy, so the "
        "uploaded ncpipe, relative paths and registry models (models/) are what the job uses. Prints the "
        "submission id, then the job's log until it ends; exit status 0 when it SUCCEEDED, 1 when it FAILED "
        "or was STOPPED.",
    )
    p.add_argument("spec", help="job spec file inside --working-dir (e.g. jobs/compress-s3.yaml)")
    _add_address(p)
    p.add_argument("--working-dir", default=".", help="directory uploaded as the job's working dir (default: .)")
    p.add_argument("--no-wait", action="store_true", help="print the submission id and return at once")
    p.add_argument("--pip", action="append", default=[], metavar="REQUIREMENT",
                   help="extra pip requirement installed for this job on the cluster (repeatable)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="gitignore-style pattern kept out of the upload (repeatable)")
    p.add_argument("--submission-id", help="use this id instead of a generated one (must be new on the cluster)")
    _add_output(p)
    p.set_defaults(handler=_submit)


def _submit(args: argparse.Namespace) -> int:
    from ncpipe.operations.submission import jobs_client, plan_submission, submit

    plan = plan_submission(args.spec, args.working_dir, tuple(args.pip), tuple(args.exclude), output=args.output)
    for warning in plan.warnings:
        log.warning("%s", warning)
    log.info("uploading %s: %d files, %.1f MB; entrypoint: %s", plan.runtime_env["working_dir"],
             plan.upload_files, plan.upload_bytes / 1e6, plan.entrypoint)
    client = jobs_client(args.address)
    submission_id = submit(client, plan, args.submission_id)
    print(submission_id, flush=True)
    if args.no_wait:
        log.info("follow with: ncpipe job logs %s --follow; stop with: ncpipe job stop %s",
                 submission_id, submission_id)
        return EXIT_OK
    return _wait(client, submission_id)


def _wait(client, submission_id: str) -> int:
    from ncpipe.operations.submission import follow, job_status

    try:
        status = follow(client, submission_id, sys.stdout)
    except KeyboardInterrupt:
        log.warning("stopped following; job %s goes on on the cluster (ncpipe job stop %s ends it)",
                    submission_id, submission_id)
        return EXIT_INTERRUPTED
    _, message = job_status(client, submission_id)
    print(f"{submission_id} {status}" + (f": {message}" if status != "SUCCEEDED" and message else ""), flush=True)
    return EXIT_OK if status == "SUCCEEDED" else EXIT_FAILED


def _add_job(sub) -> None:
    p = sub.add_parser("job", help="status, logs or stop of a submitted job",
                       description="Query or stop a job submitted with `ncpipe submit`, by its submission id.")
    actions = p.add_subparsers(dest="job_command", required=True, metavar="ACTION")
    status = actions.add_parser("status", help="print the job's status; exit 0 if it succeeded or is still "
                                "pending/running, 1 if it failed or was stopped")
    status.add_argument("submission_id")
    _add_address(status)
    status.set_defaults(handler=_job_status)
    logs = actions.add_parser("logs", help="print the job's log (--follow: until it ends, exit status as submit)")
    logs.add_argument("submission_id")
    logs.add_argument("--follow", action="store_true", help="keep printing until the job ends")
    _add_address(logs)
    logs.set_defaults(handler=_job_logs)
    stop = actions.add_parser("stop", help="stop a running job")
    stop.add_argument("submission_id")
    _add_address(stop)
    stop.set_defaults(handler=_job_stop)


def _job_status(args: argparse.Namespace) -> int:
    from ncpipe.operations.submission import job_status, jobs_client

    status, message = job_status(jobs_client(args.address), args.submission_id)
    print(f"{args.submission_id} {status}" + (f": {message}" if message else ""))
    return EXIT_OK if status == "SUCCEEDED" or status in _ACTIVE_STATES else EXIT_FAILED


def _job_logs(args: argparse.Namespace) -> int:
    from ncpipe.operations.submission import job_logs, jobs_client

    client = jobs_client(args.address)
    if args.follow:
        return _wait(client, args.submission_id)
    sys.stdout.write(job_logs(client, args.submission_id))
    return EXIT_OK


def _job_stop(args: argparse.Namespace) -> int:
    from ncpipe.operations.submission import jobs_client, stop_job

    stopped = stop_job(jobs_client(args.address), args.submission_id)
    print(f"{args.submission_id} {'stop requested' if stopped else 'had already finished'}")
    return EXIT_OK
