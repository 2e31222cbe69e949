"""A worker plan the Ray cluster cannot hold fails before any shard work, instead of hanging."""

import re
import threading
from pathlib import Path

import pytest
import ray

from ncpipe.config import ClusterConfig, CompressConfig, ConfigError
from ncpipe.models.checkpoint import CheckpointError
from ncpipe.pipeline.actors import CompressActor
from ncpipe.pipeline.compress import ShardTask
from ncpipe.pipeline.distributor import ProgressLog, RayCounter, WorkerResources, check_fits, ray_actor, run_on_actors
from ncpipe.pipeline.jobs import run_compress
from tests.factories import encoded, kodak_pixels
from tests.helpers import tar_bytes


def _within(seconds: float, call) -> BaseException | None:
    """What ``call`` raised (None if it returned); fails the test if it runs past ``seconds``.
    A daemon thread, so a regression (a job waiting forever) cannot hang the test session."""
    raised: list[BaseException | None] = [None]

    def target() -> None:
        try:
            call()
        except BaseException as err:  # handed back to the test to assert on
            raised[0] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    return raised[0]


def test_check_fits_names_the_shortfall_and_the_fix():
    with pytest.raises(ConfigError, match=re.escape(
            "3 workers × 1 CPU need 3 CPUs, the cluster has 2: pass --workers 2 (or fewer CPUs per worker)")):
        check_fits(3, WorkerResources(num_cpus=1.0, num_gpus=0.0), cpus=2.0, gpus=0, device="auto")


def test_check_fits_when_not_one_worker_fits():
    with pytest.raises(ConfigError, match=re.escape(
            "1 worker × 4 CPUs need 4 CPUs, the cluster has 2: pass --cpus-per-worker 2 or less")):
        check_fits(1, WorkerResources(num_cpus=4.0, num_gpus=0.0), cpus=2.0, gpus=0, device="cpu")


def test_check_fits_cuda_without_gpus():
    with pytest.raises(ConfigError, match="device 'cuda:0' needs a GPU, the cluster has none"):
        check_fits(1, WorkerResources(num_cpus=1.0, num_gpus=0.0), cpus=8.0, gpus=0, device="cuda:0")


@pytest.mark.parametrize("count, cpus_each, gpus_each, cpus, gpus", [
    (2, 1.0, 0.0, 2.0, 0),  # exactly full
    (3, 0.1, 0.0, 0.3, 0),  # fractional requests whose float sum exceeds 0.3
    (4, 3.0, 0.5, 12.0, 2),  # GPU shares
])
def test_check_fits_accepts_plans_that_fit(count, cpus_each, gpus_each, cpus, gpus):
    check_fits(count, WorkerResources(num_cpus=cpus_each, num_gpus=gpus_each), cpus, gpus, device="auto")


def test_compress_with_too_many_workers_fails_fast(tmp_path, tiny_model_path, ray_local):
    cpus = int(ray.cluster_resources()["CPU"])
    inputs = tmp_path / "in"
    inputs.mkdir()
    for s in range(cpus + 1):  # a shard for every worker, so the one Ray cannot place gets one
        image = encoded(kodak_pixels(1 + s % 24, (64, 64)), "PNG")
        (inputs / f"data-{s:06d}.tar").write_bytes(tar_bytes([(f"s{s}/img000.png", image)]))
    config = CompressConfig(inputs=(str(inputs),), output=str(tmp_path / "out"), model=str(tiny_model_path),
                            cluster=ClusterConfig(workers=cpus + 1, cpus_per_worker=1))
    # Before the check, this job waited forever for the worker Ray could not place.
    error = _within(60, lambda: run_compress(config))
    assert isinstance(error, ConfigError)
    assert str(error) == (f"{cpus + 1} workers × 1 CPU need {cpus + 1} CPUs, the cluster has {cpus}: "
                          f"pass --workers {cpus} (or fewer CPUs per worker)")
    assert not list(Path(config.output).rglob("*.tar"))


def test_a_model_missing_on_the_workers_fails_once_before_any_shard(tmp_path, tiny_model_path, ray_local):
    """The driver found the model, the workers' node does not have it: one error, no shard retried."""
    config = CompressConfig(inputs=("in",), output=str(tmp_path / "out"), model=str(tmp_path / "gone" / "model.pt"))
    counter = RayCounter("compress")
    progress = ProgressLog(2, "compress", counter)
    tasks = [ShardTask(f"in/d-{s}.tar", f"d-{s}", *(str(tmp_path / f"{kind}-{s}") for kind in "smc"), "job", "fp",
                       "g0000") for s in range(2)]
    make = lambda: ray_actor(CompressActor).options(num_cpus=0.5, max_restarts=3,  # noqa: E731
                                                    max_task_retries=0).remote(config, 1, counter.name)
    error = _within(60, lambda: run_on_actors(tasks, make, 2, 3, describe=str, progress=progress))
    assert isinstance(error, CheckpointError) and "no model named or at" in str(error), error
    assert not list(tmp_path.glob("[smc]-*"))  # no shard was started
