"""Fixtures of the operations tests: one embedded Ray whose workers have the S3 fixture's AWS env."""

from __future__ import annotations

import os

import pytest
import ray

from ncpipe.config import ClusterConfig
from ncpipe.pipeline.distributor import connect


@ray.remote(num_cpus=0)
def _worker_env(name: str) -> str | None:
    return os.environ.get(name)


@pytest.fixture(scope="session")
def ray_with_s3_env(s3_server: str):
    """The session's embedded Ray, started after the S3 fixture set the AWS env.

    Ray workers inherit the environment of the process that starts Ray, when it starts it; so
    an embedded Ray started before ``s3_server`` (another package's tests ran first) is
    restarted once here, and its workers are checked to see the loopback endpoint.
    """
    if ray.is_initialized() and ray.get(_worker_env.remote("AWS_ENDPOINT_URL_S3")) != s3_server:
        ray.shutdown()
    connect(ClusterConfig())
    assert ray.get(_worker_env.remote("AWS_ENDPOINT_URL_S3")) == s3_server
    yield
    ray.shutdown()
