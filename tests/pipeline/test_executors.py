"""Where a job's worker runs: the in-process executor, and the rule ``auto`` follows."""

from __future__ import annotations

from pathlib import Path

import pytest

from ncpipe.config import ClusterConfig, CompressConfig, ConfigError
from ncpipe.models.checkpoint import CheckpointError
from ncpipe.pipeline.actors import CompressActor
from ncpipe.pipeline.compress import ShardTask
from ncpipe.pipeline.distributor import ProgressLog, SampleCounter, run_in_process, runs_in_process


@pytest.mark.parametrize(
    "cluster, expected",
    [
        (ClusterConfig(), True),
        (ClusterConfig(workers=1, cpus_per_worker=1), True),
        (ClusterConfig(executor="in-process"), True),
        (ClusterConfig(executor="ray"), False),
        (ClusterConfig(address="ray://head:10001"), False),
        (ClusterConfig(workers=2), False),
    ],
)
def test_auto_runs_one_local_worker_in_process(cluster, expected):
    assert runs_in_process(cluster, "cpu") is expected


def test_a_submitted_ray_job_runs_on_its_cluster(monkeypatch):
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    assert not runs_in_process(ClusterConfig(), "cpu")


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"executor": "threads"}, "executor: must be one of auto, ray, in-process"),
        ({"executor": "in-process", "workers": 2}, "need --executor ray"),
        ({"executor": "in-process", "address": "auto"}, "need --executor ray"),
    ],
)
def test_executor_settings_that_cannot_work_are_refused(fields, message):
    with pytest.raises(ConfigError, match=message):
        ClusterConfig(**fields)


class _Actor:
    """An actor whose shard ``bad`` raises, as a worker's unexpected error would."""

    def __init__(self, report):
        self.report, self.closed, self.ran = report, False, []

    def ready(self) -> bool:
        return True

    def run(self, task):
        if task.stem == "bad":
            raise OSError("disk full while writing shards/bad.tar")
        self.report(3)
        self.ran.append(task.stem)
        return task.stem

    def close(self) -> None:
        self.closed = True


def _task(stem: str) -> ShardTask:
    return ShardTask(f"in/{stem}.tar", stem, "s", "m", "c", "job", "fp", "g0000")


def test_a_failing_shard_is_recorded_and_the_next_runs():
    progress = ProgressLog(3, "compress", SampleCounter())
    actors = []

    def make():
        actors.append(_Actor(progress.samples_done))
        return actors[-1]

    outcome = run_in_process([_task("a"), _task("bad"), _task("c")], make, str, progress)
    assert outcome.results == ["a", "c"]
    assert [(f.task.stem, f.error) for f in outcome.failures] == [("bad", "disk full while writing shards/bad.tar")]
    assert progress.progress.done == 2 and progress.images == 6
    assert actors[0].closed


def test_a_worker_that_cannot_set_up_fails_before_any_shard(tmp_path):
    """The worker's configuration error (here: its model is gone) is raised as itself, once."""
    config = CompressConfig(inputs=("in",), output=str(tmp_path / "out"), model=str(tmp_path / "gone" / "model.pt"))
    progress = ProgressLog(2, "compress", SampleCounter())
    tasks = [ShardTask(f"in/d-{s}.tar", f"d-{s}", *(str(tmp_path / f"{kind}-{s}") for kind in "smc"), "job", "fp",
                       "g0000") for s in range(2)]
    with pytest.raises(CheckpointError, match="no model named or at"):
        run_in_process(tasks, lambda: CompressActor(config, 1, progress.samples_done), str, progress)
    assert not list(Path(tmp_path).glob("[smc]-*"))
