"""Fixtures for the reliability tests: an S3 server that fails on demand, Ray."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path
from typing import Iterator

import pytest
import ray

from ncpipe.config import ClusterConfig
from ncpipe.pipeline.distributor import connect
from tests.reliability.support import FAULT_ACCESS_KEY_ID, FAULT_SECRET, FaultInjector, FaultyS3

_buckets = itertools.count()


@pytest.fixture(scope="session")
def ray_local():
    """One embedded local Ray for the session (shared with tests/pipeline when both run)."""
    connect(ClusterConfig())
    yield
    ray.shutdown()


@pytest.fixture
def faulty_s3(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FaultyS3]:
    """A moto S3 server on 127.0.0.1 behind a :class:`FaultInjector`, reached through the standard AWS
    env. ``AWS_MAX_ATTEMPTS=1`` switches botocore's own retries off, so a transient error reaches
    ncpipe's retry layer (``ncpipe.io.storage.retrying``), which is what these tests are about."""
    import fsspec
    import s3fs
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    faults = FaultInjector(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, faults, threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    staging = tmp_path / "staging"
    staging.mkdir()
    env = {
        "AWS_ACCESS_KEY_ID": FAULT_ACCESS_KEY_ID, "AWS_SECRET_ACCESS_KEY": FAULT_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": endpoint, "AWS_MAX_ATTEMPTS": "1",
        "AWS_CONFIG_FILE": "/nonexistent/aws-config", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
        "TMPDIR": str(staging),  # staged uploads go here: a leftover temp is visible to the test
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.setattr("tempfile.tempdir", None)  # re-read TMPDIR
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"faulty-{next(_buckets)}"  # moto's state is per process, shared by its servers
    fsspec.filesystem("s3").mkdir(bucket)
    try:
        yield FaultyS3(endpoint, f"s3://{bucket}", faults, env)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.shutdown()
        thread.join()
