"""Shared fixtures: a loopback S3 server, fresh buckets, shard builders, local-or-S3 roots, the tiny codec."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pytest
import torch

from ncpipe.codec import LearnedCodec
from ncpipe.models.checkpoint import load_codec_model
from tests.factories import train_tiny_codec
from tests.helpers import Member, tar_bytes

TEST_SECRET = "testing-secret-value"
TEST_ACCESS_KEY_ID = "testing-access-key-id"
_bucket_numbers = itertools.count()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A moto S3 API server on 127.0.0.1 (a free port) that s3fs reaches through the standard AWS env.

    botocore (1.31+) reads the per-service endpoint ``AWS_ENDPOINT_URL_S3``, and s3fs passes no
    endpoint of its own, so nothing in ncpipe is told about the server. The AWS config and
    credentials files are pointed away so a developer's profile cannot leak in.
    """
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as env:
        # not the bare word "testing": redact() removes the key id wherever it appears, test paths included
        env.setenv("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY_ID)
        env.setenv("AWS_SECRET_ACCESS_KEY", TEST_SECRET)
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_ENDPOINT_URL_S3", endpoint)
        env.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
        env.delenv("AWS_PROFILE", raising=False)
        env.delenv("AWS_SESSION_TOKEN", raising=False)
        s3fs.S3FileSystem.clear_instance_cache()  # cached instances would keep the old env
        yield endpoint
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A new, empty bucket: ``s3://<bucket>``."""
    import fsspec

    bucket = f"ncpipe-test-{next(_bucket_numbers)}"
    fsspec.filesystem("s3").mkdir(bucket)
    return f"s3://{bucket}"


@pytest.fixture(params=["local", "s3"])
def storage_root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same test against a local directory and an S3 bucket."""
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_bucket")


@pytest.fixture
def make_shard(tmp_path: Path) -> Callable[..., str]:
    """``make_shard(members, name="shard.tar", compression="")``: writes a tar under tmp_path, returns its path."""

    def make(members: Iterable[Member], name: str = "shard.tar", compression: str = "") -> str:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(tar_bytes(members, compression))
        return str(path)

    return make


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real mbt2018-mean (N=16, M=24) trained for a few steps by ncpipe's trainer and released."""
    return train_tiny_codec(tmp_path_factory.mktemp("tiny-model"))


TINY_VBR_LAMBDAS = (0.004, 0.016, 0.064)


@pytest.fixture(scope="session")
def tiny_vbr_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real variable-rate mbt2018-mean (N=16, M=24; quality levels 1..3) trained for a few steps and released."""
    return train_tiny_codec(tmp_path_factory.mktemp("tiny-vbr-model"), steps=30, lambdas=TINY_VBR_LAMBDAS)


@pytest.fixture(scope="module")
def tiny_codec(tiny_model_path: Path) -> Iterator[LearnedCodec]:
    """The tiny model as a codec (one coder thread), one per test module."""
    codec = LearnedCodec(load_codec_model(tiny_model_path), coder_threads=1)
    yield codec
    codec.close()


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Tensors in the diffusion tests are tiny: intra-op threads only add sync cost, 30x on a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
