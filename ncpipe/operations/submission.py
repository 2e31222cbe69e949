"""Running job specs on a remote Ray cluster through the Ray Jobs API (the head's dashboard port).

::

    ncpipe submit jobs/x.yaml --address http://HEAD:8265 --working-dir .
      spec validated here ─► working dir zipped, uploaded (excludes) ─► the head runs
      `python -m ncpipe run jobs/x.yaml` in the unpacked copy ─► the driver joins the cluster
      ($RAY_ADDRESS, set by Ray) ─► codec actors on the workers, whose sys.path and cwd are that copy

So the uploaded ``ncpipe/`` (not whatever the image has installed) runs the job, relative
paths in the spec resolve inside the copy, and registry models resolve from the copy's
``models/``, or from the model store (``$NCPIPE_MODEL_STORE``, passed on to the job): the
models the store holds identically are left out of the upload. Files bigger than the working
dir allows (Ray: one gRPC message, 512 MiB) belong in object storage, named by URL in the spec.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import shlex
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

from ncpipe.errors import NcpipeError
from ncpipe.io.urls import redact
from ncpipe.models import store
from ncpipe.operations.jobspec import load_spec, with_output

log = logging.getLogger(__name__)

DEFAULT_EXCLUDES = (
    ".git", ".venv", "venv", "out", "runs", "build", "dist", "__pycache__", "*.egg-info",
    ".pytest_cache", ".hypothesis", ".mypy_cache", ".devbundle", ".devdata", "*.nbi", "*.nbc",
)
UPLOAD_LIMIT_BYTES = 512 * 1024**2  # Ray's limit on a working_dir package (ray_constants.GRPC_CPP_MAX_MESSAGE_SIZE)
TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # what Ray's client reads, in its order
POLL_SECONDS = 2.0


class SubmissionError(NcpipeError, ValueError):
    """The cluster refused or cannot be reached, or the submission would not work there."""


@dataclass(frozen=True)
class Submission:
    """What is sent: the entrypoint the head runs and the runtime env it runs in."""

    spec: str  # path of the spec inside the working dir, as the entrypoint names it
    entrypoint: str
    runtime_env: dict[str, Any]
    upload_bytes: int
    upload_files: int
    warnings: list[str] = field(default_factory=list)


def plan_submission(
    spec_path: str | Path,
    working_dir: str | Path = ".",
    pip: tuple[str, ...] = (),
    excludes: tuple[str, ...] = (),
    limit_bytes: int = UPLOAD_LIMIT_BYTES,
    output: str | None = None,
) -> Submission:
    """Validate ``spec_path`` here and build the submission that runs it from ``working_dir``
    (writing to ``output`` instead of the spec's output when given)."""
    spec = with_output(load_spec(spec_path), output)
    root = Path(working_dir).resolve()
    if not root.is_dir():
        raise SubmissionError(f"--working-dir {working_dir} is not a directory")
    relative = Path(os.path.relpath(Path(spec_path).resolve(), root))
    if relative.parts[0] == "..":
        raise SubmissionError(f"the spec {spec_path} is outside --working-dir {root}: it is uploaded with that "
                              "directory, so keep it inside (e.g. jobs/) or pass a --working-dir that holds it")
    # Models the store provides are not uploaded: the job's workers fetch them from the store.
    from_store = store.provided_by_store(root / "models")
    patterns = (*DEFAULT_EXCLUDES, *(f"models/{name}" for name in from_store), *excludes)
    if is_excluded(relative.as_posix(), patterns):
        raise SubmissionError(f"the spec {relative} is excluded from the upload ({', '.join(patterns)}); "
                              "move it, e.g. to jobs/")
    files = upload_files(root, (*patterns, *_gitignore_patterns(root)))
    total = sum(size for _, size in files)
    if total >= limit_bytes:
        biggest = ", ".join(f"{name} ({size / 2**20:.0f} MiB)" for name, size in sorted(files, key=lambda f: -f[1])[:5])
        raise SubmissionError(f"--working-dir {root} holds {total / 2**20:.0f} MiB to upload, over Ray's limit of "
                              f"{limit_bytes / 2**20:.0f} MiB; largest: {biggest}. Exclude them with --exclude, or "
                              "keep data in object storage and name it by URL in the spec")
    runtime_env: dict[str, Any] = {"working_dir": str(root), "excludes": list(patterns)}
    runtime_env.update(store.model_runtime_env() or {})
    if from_store:
        log.info("not uploading %s: the model store %s provides them", ", ".join(from_store),
                 redact(store.store_url() or ""))
    if pip:
        runtime_env["pip"] = list(pip)
    return Submission(
        spec=relative.as_posix(),
        entrypoint=f"python -m ncpipe run {shlex.quote(relative.as_posix())}"
        + (f" --output {shlex.quote(output)}" if output else ""),
        runtime_env=runtime_env,
        upload_bytes=total,
        upload_files=len(files),
        warnings=host_path_warnings(spec.config),
    )


def is_excluded(relative: str, patterns: tuple[str, ...]) -> bool:
    """Whether a path (relative, ``/``-separated) matches a pattern: anchored if it holds ``/``, else any part."""
    parts = relative.split("/")
    for pattern in patterns:
        anchored = pattern.strip("/")
        if "/" in anchored:
            if any(fnmatch.fnmatch("/".join(parts[: i + 1]), anchored) for i in range(len(parts))):
                return True
        elif any(fnmatch.fnmatch(part, anchored) for part in parts):
            return True
    return False


def upload_files(root: Path, patterns: tuple[str, ...]) -> list[tuple[str, int]]:
    """``(relative path, size)`` of each file that would be uploaded (an upper bound: Ray may exclude more)."""
    found = []
    for directory, subdirs, names in os.walk(root):
        base = Path(directory).relative_to(root)
        subdirs[:] = [d for d in subdirs if not is_excluded((base / d).as_posix(), patterns)]
        for name in names:
            relative = (base / name).as_posix()
            path = Path(directory) / name
            if not is_excluded(relative, patterns) and path.is_file():
                found.append((relative, path.stat().st_size))
    return found


def _gitignore_patterns(root: Path) -> tuple[str, ...]:
    """The top-level .gitignore's plain patterns (Ray honours .gitignore files too)."""
    path = root / ".gitignore"
    if not path.is_file():
        return ()
    lines = (line.strip() for line in path.read_text().splitlines())
    return tuple(line for line in lines if line and not line.startswith(("#", "!")))


def host_path_warnings(config: Any) -> list[str]:
    """Local paths in a config that do not mean on the cluster what they mean here: absolute ones name
    files on the cluster's nodes; a relative output lands in the job's unpacked working directory on the
    head, a temporary folder nobody looks in."""
    values = []
    for name in ("inputs", "model"):
        value = getattr(config, name, None)
        values += list(value) if isinstance(value, (list, tuple)) else [value]
    warnings = [
        f"{redact(value)} is an absolute local path: the job reads it on the cluster's nodes "
        "(use a path inside the working dir, a registry model name, or an object-store URL)"
        for value in values
        if isinstance(value, str) and os.path.isabs(value)
    ]
    output = getattr(config, "output", None)
    if isinstance(output, str) and "://" not in output:
        warnings.append(
            f"output {redact(output)} is an absolute local path: the job writes it on the cluster's nodes"
            if os.path.isabs(output) else
            f"output {redact(output)} is relative: the job writes it inside its temporary working directory on "
            "the head; pass --output with an object-store URL (or an absolute path on the head) to find the result")
    return warnings


@contextmanager
def _address_env_removed() -> Iterator[None]:
    """Ray's client lets $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS override an explicit address: hide them."""
    saved = {name: os.environ.pop(name) for name in ADDRESS_ENV if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def resolve_address(address: str | None) -> str:
    """``--address``, else $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS."""
    for candidate in (address, *(os.environ.get(name) for name in ADDRESS_ENV)):
        if candidate:
            return candidate
    raise SubmissionError("no cluster given: pass --address http://HEAD:8265 (the Ray dashboard of the head) "
                          "or set RAY_API_SERVER_ADDRESS")


def jobs_client(address: str | None):
    """A ``JobSubmissionClient`` for ``address`` (see ``resolve_address``); auth token from Ray's usual places."""
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as err:  # the Jobs SDK comes with ray[default]
        raise SubmissionError(f"the Ray Jobs client is not installed ({err}): install ray[default]") from None
    url = resolve_address(address)
    with _address_env_removed(), cluster_errors(f"connect to {url}"):
        return JobSubmissionClient(url)


@contextmanager
def cluster_errors(what: str) -> Iterator[None]:
    """Errors from the Jobs API (HTTP, connection, authentication) as one redacted ``SubmissionError``."""
    from ray.exceptions import RayError

    try:
        yield
    except (RuntimeError, ConnectionError, OSError, RayError) as err:
        raise SubmissionError(redact(f"cannot {what}: {type(err).__name__}: {err}")) from None


AGENT_STARTING = "No available agent to submit job"  # the Jobs API's answer while a new head's agent starts
AGENT_WAIT_SECONDS = 120.0


def submit(client, submission: Submission, submission_id: str | None = None,
           sleep: Callable[[float], None] = time.sleep) -> str:
    """Send ``submission``; returns the submission id. A head whose job agent is still starting
    (its dashboard answers first) is asked again, for up to ``AGENT_WAIT_SECONDS``."""
    waited = 0.0
    while True:
        try:
            with cluster_errors("submit the job"):
                return client.submit_job(
                    entrypoint=submission.entrypoint, runtime_env=submission.runtime_env,
                    submission_id=submission_id, metadata={"ncpipe_spec": submission.spec},
                )
        except SubmissionError as err:
            if AGENT_STARTING not in str(err) or waited >= AGENT_WAIT_SECONDS:
                raise
            log.info("the head's job agent is starting; submitting again in 5 s")
            sleep(5.0)
            waited += 5.0


def job_status(client, submission_id: str) -> tuple[str, str]:
    """``(status, message)`` of a job."""
    with cluster_errors(f"get job {submission_id}"):
        info = client.get_job_info(submission_id)
    return str(info.status), info.message or ""


def job_logs(client, submission_id: str) -> str:
    with cluster_errors(f"get the logs of job {submission_id}"):
        return client.get_job_logs(submission_id)


def stop_job(client, submission_id: str) -> bool:
    """Ask the cluster to stop a job; False if it had already finished."""
    with cluster_errors(f"stop job {submission_id}"):
        return client.stop_job(submission_id)


def follow(
    client,
    submission_id: str,
    out: TextIO,
    poll_seconds: float = POLL_SECONDS,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Print the job's log as it grows until the job ends; returns its final status."""
    printed = 0
    while True:
        status, _ = job_status(client, submission_id)  # read before the logs: a final read then has them all
        logs = job_logs(client, submission_id)
        if len(logs) > printed:
            out.write(logs[printed:])
            out.flush()
            printed = len(logs)
        if status in TERMINAL_STATES:
            return status
        sleep(poll_seconds)
