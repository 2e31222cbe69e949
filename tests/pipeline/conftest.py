import pytest
import ray

from ncpipe.config import ClusterConfig
from ncpipe.pipeline.distributor import connect


@pytest.fixture(scope="session")
def ray_local():
    """One embedded local Ray for the session (starting one costs ~10 s)."""
    connect(ClusterConfig())
    yield
    ray.shutdown()
