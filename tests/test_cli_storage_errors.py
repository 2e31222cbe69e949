"""Storage failures at the edge are told apart and named in one line (exit 2, no traceback):
no server at the endpoint, no credentials, no such bucket or object, access denied."""

from __future__ import annotations

import logging
import socket

import pytest
import s3fs

from ncpipe.cli import main
from ncpipe.cli.exit_status import EXIT_USAGE
from ncpipe.io.failures import AccessDeniedError, CredentialsError, StorageUnreachableError, classify
from ncpipe.io.storage import read_bytes


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens once the socket is closed


def _error_line(caplog, argv: list[str]) -> str:
    caplog.clear()
    assert main(argv) == EXIT_USAGE
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not record.exc_info
    message = record.getMessage()
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.fixture
def fresh_s3_clients():
    s3fs.S3FileSystem.clear_instance_cache()  # instances cache the environment they were made in
    yield
    s3fs.S3FileSystem.clear_instance_cache()


def test_no_server_at_the_endpoint_is_named(s3_server, fresh_s3_clients, monkeypatch, caplog, tmp_path):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries only slow the test down
    for spec in ("s3://bucket/data/shard-000000.tar", "s3://bucket/data/", "s3://bucket/data/*.tar"):
        message = _error_line(caplog, ["compress", spec, "-o", str(tmp_path / "out")])
        assert f"cannot connect to the storage endpoint {endpoint}" in message, message
        assert "does not exist" not in message


def test_missing_credentials_are_named(s3_bucket, fresh_s3_clients, monkeypatch, caplog, tmp_path):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role to find on this machine
    message = _error_line(caplog, ["compress", f"{s3_bucket}/data/", "-o", str(tmp_path / "out")])
    assert "no storage credentials found" in message and "AWS_ACCESS_KEY_ID" in message


def test_missing_bucket_and_missing_object_are_told_apart(s3_bucket, fresh_s3_clients, caplog, tmp_path):
    message = _error_line(caplog, ["compress", "s3://no-such-bucket-here/a.tar", "-o", str(tmp_path / "out")])
    assert "no such bucket" in message
    message = _error_line(caplog, ["compress", f"{s3_bucket}/missing.tar", "-o", str(tmp_path / "out")])
    assert message.endswith("missing.tar does not exist")


def test_a_storage_call_names_the_failure(s3_server, fresh_s3_clients, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setattr("ncpipe.io.storage.BACKOFF_S", 0.0)
    with pytest.raises(StorageUnreachableError, match="cannot read s3://bucket/x: cannot connect"):
        read_bytes("s3://bucket/x")


def test_access_denied_as_s3fs_reports_it():
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    denied = ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, "GetObject")
    translated = translate_boto_error(denied)
    assert isinstance(translated, PermissionError)  # what s3fs raises; its cause names the code
    translated.__cause__ = denied
    error = classify(translated, "cannot read s3://b/x")
    assert isinstance(error, AccessDeniedError) and "access denied" in str(error)
    refused = ClientError({"Error": {"Code": "InvalidAccessKeyId", "Message": "no such key"}}, "ListObjectsV2")
    assert isinstance(classify(refused, "input s3://b/x"), CredentialsError)
    assert classify(ValueError("unrelated"), "input s3://b/x") is None
