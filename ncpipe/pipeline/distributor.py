"""Runs shard tasks on workers: backpressure, retries, progress.

Two executors. On Ray (``run_on_actors``), each actor has at most one shard in flight (inside it,
the shard's stages overlap), so the number of shards in flight is bounded by the number of actors.
A shard whose actor dies (process killed, node lost) is retried on the restarted actor up to
``max_shard_attempts`` times; its partial outputs were never visible, because every output is
committed atomically and counted only once its commit marker exists. In-process
(``run_in_process``), one worker in the job's own process runs the shards one after another: no
Ray to start, no second process to load the model into, which is most of a small job's wall time;
a worker process lost there is the job lost, and a re-run resumes from the committed shards. The
worker then sets up the job's own process as an actor sets up its own: torch's thread count and the
allocator setting of ``ncpipe.allocator`` stay in effect after the job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ncpipe.config import IN_PROCESS, ClusterConfig, ConfigError
from ncpipe.errors import NcpipeError
from ncpipe.io.urls import redact
from ncpipe.models.store import model_runtime_env
from ncpipe.progress import Progress

log = logging.getLogger(__name__)

_ACTOR_LOST = (RayActorError, ActorDiedError, ActorUnavailableError)
PROGRESS_EVERY_SECONDS = 5.0  # between log lines
TERMINAL_TICK_SECONDS = 1.0  # between redraws of a terminal's progress bar


def connect(cluster: ClusterConfig) -> None:
    """Join ``cluster.address`` (or, as a Ray job's entrypoint, the job's cluster), else start an
    embedded Ray bound to loopback."""
    if ray.is_initialized():
        return
    if cluster.address:  # workers on other nodes get models from the same places as this process
        ray.init(address=cluster.address, logging_level=logging.WARNING, runtime_env=model_runtime_env())
    elif address := _submitted_job_cluster():  # the job's runtime env (ncpipe submit) already carries them
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        with _loopback_only():
            # "local": a new cluster even when RAY_ADDRESS or a `ray start` cluster exists. No idle
            # workers prestarted: the job starts the actors it needs, and on a small machine the
            # prestarted ones' imports take CPU from the first shards.
            ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING,
                     _system_config={"enable_worker_prestart": False, "prestart_worker_first_driver": False})


def _submitted_job_cluster() -> str | None:
    """The cluster of the Ray job this process is the entrypoint of (``ncpipe submit``, a KubeRay
    RayJob), or None. Ray's job supervisor gives an entrypoint its job config (runtime env: the
    uploaded working dir, on that cluster's GCS) and the cluster's RAY_ADDRESS; a RAY_ADDRESS
    alone (a user's shell) does not make a job join a cluster."""
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        return os.environ.get("RAY_ADDRESS") or "auto"
    return None


# Ray resolves a node IP of 127.0.0.1 to the machine's external address and binds its
# servers there (or to every interface); only its single-machine mode (this switch off)
# keeps the GCS, raylet, workers and agents on loopback. Ray reads it at import, so it is
# also set on the imported constant; its processes, started by ray.init, inherit it.
_SINGLE_NODE_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def _loopback_only():
    from ray._private import ray_constants

    saved = os.environ.get(_SINGLE_NODE_SWITCH), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_SINGLE_NODE_SWITCH] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:  # later connections to real clusters from this process behave as before
        if saved[0] is None:
            os.environ.pop(_SINGLE_NODE_SWITCH, None)
        else:
            os.environ[_SINGLE_NODE_SWITCH] = saved[0]
        ray_constants.ENABLE_RAY_CLUSTER = saved[1]


def runs_in_process(cluster: ClusterConfig, device: str) -> bool:
    """Whether a job runs its one worker in its own process (``ClusterConfig.executor``); ``auto``
    does so for a job of one worker on this machine."""
    if cluster.executor != "auto":
        return cluster.executor == IN_PROCESS
    if cluster.address or _submitted_job_cluster() or (cluster.workers or 1) > 1:
        return False
    return device == "cpu" or _local_gpus() <= 1  # one Ray actor per GPU otherwise


def _local_gpus() -> int:
    import torch  # already imported by the driver (checkpoints are torch files)

    return torch.cuda.device_count()


def in_process_threads(cluster: ClusterConfig) -> int:
    """Threads of the in-process worker: ``cpus_per_worker``, or the CPUs this process may use."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return WorkerResources(num_cpus=cluster.cpus_per_worker or usable, num_gpus=0.0).threads


@functools.cache
def ray_actor(actor_class: type) -> Any:
    """``actor_class`` as a Ray actor class (made once per class)."""
    return ray.remote(actor_class)


@dataclass(frozen=True)
class WorkerResources:
    """What each codec actor asks Ray for, and the threads it then uses."""

    num_cpus: float
    num_gpus: float

    @property
    def threads(self) -> int:
        return max(1, int(self.num_cpus))


def plan_workers(cluster: ClusterConfig, device: str = "auto") -> tuple[int, WorkerResources]:
    """How many codec actors, and what each asks for, on the connected cluster; a ConfigError
    when the cluster cannot hold them all."""
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 1.0), int(resources.get("GPU", 0))
    count, per_worker = _size_workers(cluster, cpus, gpus)
    check_fits(count, per_worker, cpus, gpus, device)
    return count, per_worker


def _size_workers(cluster: ClusterConfig, cpus: float, gpus: int) -> tuple[int, WorkerResources]:
    if gpus:
        count = cluster.workers or gpus
        per_cpu = cluster.cpus_per_worker or max(1.0, (cpus - 1) // count)
        return count, WorkerResources(num_cpus=per_cpu, num_gpus=min(1.0, gpus / count))
    count = cluster.workers or 1
    return count, WorkerResources(num_cpus=cluster.cpus_per_worker or max(1.0, cpus // count), num_gpus=0.0)


_SLACK = 1e-6  # float sums of fractional requests (3 x 0.1 CPU) must not fail on rounding


def check_fits(count: int, per_worker: WorkerResources, cpus: float, gpus: float, device: str) -> None:
    """Refuse a plan the cluster cannot run all at once: Ray queues an actor it cannot place,
    and the shard handed to that actor then waits forever instead of failing."""
    if device.startswith("cuda") and not gpus:
        raise ConfigError(f"device {device!r} needs a GPU, the cluster has none: pass --device cpu (or auto)")
    _check_one(count, per_worker.num_cpus, cpus, "CPU", f"pass --cpus-per-worker {cpus:g} or less")
    _check_one(count, per_worker.num_gpus, gpus, "GPU", "run on a cluster with GPUs")


def _check_one(count: int, each: float, available: float, unit: str, fix_if_none_fit: str) -> None:
    needed = count * each
    if needed <= available + _SLACK:
        return
    fit = int((available + _SLACK) // each)
    fix = f"pass --workers {fit} (or fewer {unit}s per worker)" if fit else fix_if_none_fit
    raise ConfigError(
        f"{_count(count, 'worker')} × {_count(each, unit)} need {_count(needed, unit)}, "
        f"the cluster has {available:g}: {fix}"
    )


def _count(number: float, noun: str) -> str:
    return f"{number:g} {noun}{'' if number == 1 else 's'}"


@dataclass(frozen=True)
class ShardFailure:
    task: Any
    error: str

    def describe(self) -> str:
        """The failed shard and why, for summaries (credentials redacted)."""
        return f"{redact(self.task.input_url)}: {self.error}"


@dataclass
class PoolOutcome:
    results: list[Any]
    failures: list[ShardFailure]

    def fail(self, task: Any, reason: str, describe: Callable[[Any], str]) -> None:
        """Book ``task`` as failed for ``reason`` (credentials redacted), and log it."""
        reason = redact(reason)
        log.error("%s failed: %s", describe(task), reason)
        self.failures.append(ShardFailure(task, reason))


def run_on_actors(
    tasks: Sequence[Any],
    make_actor: Callable[[], Any],
    count: int,
    max_attempts: int,
    describe: Callable[[Any], str],
    progress: ProgressLog,
) -> PoolOutcome:
    """Run every task (a dataclass with an ``attempt`` field) through ``actor.run``."""
    actors = [make_actor() for _ in range(min(count, len(tasks)) or 0)]
    wait_ready(actors)
    idle = deque(actors)
    pending = deque(tasks)
    inflight: dict[ray.ObjectRef, tuple[Any, Any]] = {}
    outcome = PoolOutcome([], [])
    with progress:
        while pending or inflight:
            while idle and pending:
                actor, task = idle.popleft(), pending.popleft()
                inflight[actor.run.remote(task)] = (task, actor)
            _collect(inflight, idle, pending, outcome, make_actor, max_attempts, describe, progress)
        progress.tick(force=True)
    return outcome


def _collect(inflight, idle, pending, outcome, make_actor, max_attempts, describe, progress) -> None:
    """Wait for the next finished shard (or the next progress tick) and book what finished."""
    ready, _ = ray.wait(list(inflight), num_returns=1, timeout=progress.interval)
    for ref in ready:
        task, actor = inflight.pop(ref)
        try:
            result = ray.get(ref)
        except _ACTOR_LOST as err:
            actor = _replace_if_dead(actor, make_actor)
            _retry_or_fail(task, err, max_attempts, describe, pending, outcome)
        except RayTaskError as err:
            outcome.fail(task, str(err.cause or err), describe)
        else:
            outcome.results.append(result)
            progress.shard_done(task)
        idle.append(actor)
    progress.tick()


def wait_ready(actors: Sequence[Any]) -> None:
    """Return once every actor is set up; raise its configuration error (a device or model it cannot
    have, the same on every retry) at once, before any shard is handed out."""
    for ref in [actor.ready.remote() for actor in actors]:
        try:
            ray.get(ref)
        except RayTaskError as err:
            if isinstance(err.cause, NcpipeError):
                raise err.cause from None
            raise


def _retry_or_fail(task, error, max_attempts, describe, pending, outcome) -> None:
    if task.attempt < max_attempts:
        log.warning("%s: worker lost (%s); retrying (attempt %d of %d)",
                    describe(task), type(error).__name__, task.attempt + 1, max_attempts)
        pending.appendleft(dataclasses.replace(task, attempt=task.attempt + 1))
    else:
        outcome.fail(task, f"worker lost {max_attempts} times, last: {type(error).__name__}: {error}", describe)


def _replace_if_dead(actor, make_actor):
    """Ray restarts a crashed actor (``max_restarts``); past that, start a new one."""
    try:
        ray.get(actor.ping.remote(), timeout=120)
        return actor
    except Exception:  # any failure to answer means the handle is unusable
        return make_actor()


def run_in_process(tasks: Sequence[Any], make_actor: Callable[[], Any], describe: Callable[[Any], str],
                   progress: ProgressLog) -> PoolOutcome:
    """Run every task through one actor built here, in this process; a task's error is its shard's
    failure (as a Ray task's error is), the actor's configuration error is raised before any shard."""
    actor = make_actor()
    outcome = PoolOutcome([], [])
    try:
        actor.ready()
        with progress:
            for task in tasks:
                try:
                    result = actor.run(task)
                except Exception as err:  # noqa: BLE001  (any error of one shard: recorded, the next runs)
                    outcome.fail(task, str(err), describe)
                else:
                    outcome.results.append(result)
                    progress.shard_done(task)
                progress.tick()
            progress.tick(force=True)
    finally:
        actor.close()
    return outcome


class SampleCounter:
    """Samples finished so far, reported by the worker after every batch (in-process executor)."""

    def __init__(self):
        self.samples = 0

    def add(self, samples: int) -> None:
        self.samples += samples

    def get(self) -> int:
        return self.samples


ProgressCounter = ray.remote(num_cpus=0)(SampleCounter)  # the same, as a Ray actor the workers report to


class RayCounter:
    """A job's progress counter on Ray: a named actor on the driver's node (a counter on a worker
    node would die with that node). Workers find it by name: an actor handle passed as a constructor
    argument would make Ray unable to restart a crashed worker safely."""

    def __init__(self, label: str):
        self.name = f"ncpipe-progress-{label}-{os.getpid()}-{time.time_ns()}"
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        self.actor = ProgressCounter.options(name=self.name, scheduling_strategy=here).remote()

    def get(self) -> int | None:
        """Samples so far; None when the counter cannot answer (progress is a report, never a
        reason to fail the job)."""
        try:
            return ray.get(self.actor.get.remote())
        except _ACTOR_LOST:
            log.debug("progress counter unavailable")
            return None


class ProgressLog:
    """A job's progress: shards done of the total, plus the images the workers count and the input
    bytes of the shards done; a bar on a terminal, log lines elsewhere (ncpipe.progress)."""

    def __init__(self, total_shards: int, label: str, counter: SampleCounter | RayCounter,
                 measure: Callable[[Any], int] = lambda task: 0):
        self.counter = counter  # where the workers count their finished samples
        self.images = 0
        self.progress = Progress(total_shards, unit="shards", label=label)
        self.measure = measure  # a task -> its input bytes
        self.interval = TERMINAL_TICK_SECONDS if self.progress.terminal else PROGRESS_EVERY_SECONDS

    def __enter__(self) -> "ProgressLog":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.progress.close()

    def samples_done(self, samples: int) -> None:
        """A worker in this process finished ``samples`` more (Ray workers report to the counter actor)."""
        self.counter.add(samples)
        self.tick()

    def shard_done(self, task: Any) -> None:
        self.progress.done += 1
        self.progress.nbytes += self.measure(task)

    def tick(self, force: bool = False) -> None:
        images = self.counter.get()
        self.images = self.images if images is None else images
        self.progress.update(self.progress.done, images=self.images, force=force)
