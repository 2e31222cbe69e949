"""Object-store writes that fail: transient errors are retried, permanent ones leave nothing visible.

The failures are injected at the S3 server (``FaultInjector`` in front of moto), so they reach
every process the same way: this test process, and Ray's worker processes.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import fsspec
import pytest

from ncpipe.config import ClusterConfig, CompressConfig
from ncpipe.manifest import read_manifest
from ncpipe.pipeline import jobs
from ncpipe.pipeline.distributor import ray_actor
from ncpipe.pipeline.jobs import run_compress
from ncpipe.reliability.verify import VerifyOptions, verify_archive
from tests.factories import encoded, kodak_pixels
from tests.helpers import tar_bytes
from tests.reliability.support import FAULT_ACCESS_KEY_ID, FAULT_SECRET

SAMPLES_PER_SHARD = 3


def _inputs(root: Path, shards: int = 2) -> Path:
    directory = root / "in"
    directory.mkdir()
    for s in range(shards):
        members = [(f"k{s}-{i}.png", encoded(kodak_pixels(1 + 3 * s + i, (64, 64)))) for i in range(SAMPLES_PER_SHARD)]
        (directory / f"d-{s}.tar").write_bytes(tar_bytes(members))
    return directory


def _config(inputs: Path, output: str, model: Path) -> CompressConfig:
    return CompressConfig(inputs=(str(inputs),), output=output, model=str(model), batch_size=2, metrics=False)


def _objects(bucket: str) -> set[str]:
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    return {path.split("/", 1)[1] for path in fs.find(bucket.removeprefix("s3://"))}


def _assert_exactly_once(output: str, inputs: Path, shards: int = 2) -> None:
    rows = read_manifest(f"{output}/g0000/manifest").to_pylist()
    keys = sorted((Path(r["source_url"]).name, r["sample_index"]) for r in rows)
    assert keys == [(f"d-{s}.tar", i) for s in range(shards) for i in range(SAMPLES_PER_SHARD)]
    assert all(r["status"] == "ok" for r in rows)


def _ours(caplog) -> str:
    """What ncpipe (and the test's stand-in for the distributor) logged; botocore's own DEBUG
    output prints request headers, the access key id among them, and is not ncpipe's to redact."""
    return "\n".join(r.getMessage() for r in caplog.records if r.name.startswith(("ncpipe", "tests.")))


def _assert_verified(output: str, model: Path) -> None:
    report = verify_archive(output, model=str(model), options=VerifyOptions(threads=1))
    assert report.ok, report.text()


def test_a_transient_upload_failure_is_retried(faulty_s3, tiny_model_path, tmp_path, caplog):
    inputs, output = _inputs(tmp_path), f"{faulty_s3.bucket}/archive"
    faulty_s3.faults.fail("PUT", r"/shards/d-0\.tar$", 503, "ServiceUnavailable", times=1)
    with caplog.at_level(logging.WARNING, logger="ncpipe"):
        summary = run_compress(_config(inputs, output, tiny_model_path))
    assert summary.complete
    assert faulty_s3.faults.puts(r"/shards/d-0\.tar$") == [503, None]  # refused once, then written
    assert "retrying" in caplog.text
    _assert_exactly_once(output, inputs)
    _assert_verified(output, tiny_model_path)
    assert not list((tmp_path / "staging").iterdir())  # staged temps removed


def test_a_permanent_upload_failure_fails_the_shard_and_leaves_nothing(
    faulty_s3, tiny_model_path, tmp_path, caplog
):
    inputs, output = _inputs(tmp_path), f"{faulty_s3.bucket}/archive"
    faulty_s3.faults.fail("PUT", r"/shards/d-1\.tar$", 403, "AccessDenied")
    with caplog.at_level(logging.DEBUG):
        summary = run_compress(_config(inputs, output, tiny_model_path))
    assert summary.shards_failed == [str(inputs / "d-1.tar")] and not summary.complete
    objects = _objects(faulty_s3.bucket)
    assert "archive/g0000/_commits/d-0.json" in objects
    assert not {f"archive/g0000/{p}" for p in ("shards/d-1.tar", "manifest/d-1.parquet", "_commits/d-1.json",
                                              "summary.json")} & objects
    assert "archive/CURRENT" not in objects  # readers never switch to an incomplete archive
    assert not list((tmp_path / "staging").iterdir())
    logged = _ours(caplog)
    assert "AccessDenied" in logged  # the failure was logged...
    assert FAULT_ACCESS_KEY_ID not in logged and FAULT_SECRET not in logged  # ...redacted

    faulty_s3.faults.clear()
    again = run_compress(_config(inputs, output, tiny_model_path))
    assert again.complete and again.shards_skipped == 1
    _assert_exactly_once(output, inputs)
    _assert_verified(output, tiny_model_path)


def test_a_failed_commit_marker_leaves_the_shard_uncommitted_and_a_rerun_redoes_it(
    faulty_s3, tiny_model_path, tmp_path
):
    inputs, output = _inputs(tmp_path), f"{faulty_s3.bucket}/archive"
    faulty_s3.faults.fail("PUT", r"/_commits/d-0\.json$", 403, "AccessDenied")
    summary = run_compress(_config(inputs, output, tiny_model_path))
    assert summary.shards_failed == [str(inputs / "d-0.tar")]
    report = verify_archive(output, model=str(tiny_model_path), options=VerifyOptions(threads=1))
    assert any(p.where == "d-0" and p.message.startswith("not committed") for p in report.problems)

    faulty_s3.faults.clear()
    again = run_compress(_config(inputs, output, tiny_model_path))
    assert again.complete and again.shards_skipped == 1
    _assert_exactly_once(output, inputs)
    _assert_verified(output, tiny_model_path)


class _WithEnv:
    """A Ray actor class started with extra environment variables (Ray workers inherit the env of the
    Ray started for the test session, not of the test that runs later)."""

    def __init__(self, actor_class, env: dict[str, str]):
        self.actor_class, self.env = actor_class, env

    def options(self, **options):
        return self.actor_class.options(runtime_env={"env_vars": self.env}, **options)


@pytest.mark.slow
def test_upload_failures_inside_ray_workers(faulty_s3, tiny_model_path, tmp_path, ray_local, monkeypatch):
    """The real distributor and actors: a transient failure retried in the worker, a permanent one
    reported as the shard's failure; then a re-run completes the archive."""
    monkeypatch.setattr(jobs, "ray_actor", lambda actor_class: _WithEnv(ray_actor(actor_class), faulty_s3.env))
    inputs, output = _inputs(tmp_path), f"{faulty_s3.bucket}/archive"
    on_ray = ClusterConfig(executor="ray")
    faulty_s3.faults.fail("PUT", r"/shards/d-0\.tar$", 503, "ServiceUnavailable", times=1)
    faulty_s3.faults.fail("PUT", r"/manifest/d-1\.parquet$", 403, "AccessDenied")
    summary = run_compress(dataclasses.replace(_config(inputs, output, tiny_model_path), cluster=on_ray))
    assert summary.shards_failed == [str(inputs / "d-1.tar")]
    assert faulty_s3.faults.puts(r"/shards/d-0\.tar$") == [503, None]
    objects = _objects(faulty_s3.bucket)
    assert "archive/g0000/_commits/d-0.json" in objects
    assert not {"archive/g0000/manifest/d-1.parquet", "archive/g0000/_commits/d-1.json"} & objects

    faulty_s3.faults.clear()
    again = run_compress(dataclasses.replace(_config(inputs, output, tiny_model_path), cluster=on_ray))
    assert again.complete and again.shards_skipped == 1
    _assert_exactly_once(output, inputs)
    _assert_verified(output, tiny_model_path)
    assert not list((tmp_path / "staging").iterdir())
