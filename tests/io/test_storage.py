from __future__ import annotations

import os
import re

import pytest
import s3fs
from botocore.exceptions import ClientError, EndpointConnectionError

from ncpipe.io import storage
from ncpipe.io.storage import (
    StorageError,
    atomic_writer,
    exists,
    is_transient,
    list_files,
    read_bytes,
    remove,
    remove_partials,
    remove_tree,
    retrying,
    size_of,
    write_bytes_atomic,
)
from ncpipe.io.urls import join_url
from tests.conftest import TEST_SECRET
from tests.helpers import put_bytes

PARTIAL = re.compile(r"^\.out\.tar\.partial-\d+-\d+$")


def test_write_read_exists_size_remove(storage_root):
    url = join_url(storage_root, "a", "b", "file.bin")
    assert not exists(url)
    write_bytes_atomic(url, b"payload")
    assert exists(url) and read_bytes(url) == b"payload" and size_of(url) == 7
    write_bytes_atomic(url, b"new")
    assert read_bytes(url) == b"new"
    remove(url)
    assert not exists(url)
    remove(url)  # missing is fine by default
    with pytest.raises(FileNotFoundError):
        remove(url, missing_ok=False)
    with pytest.raises(FileNotFoundError):
        read_bytes(url)


def test_atomic_writer_shows_nothing_until_a_clean_exit(storage_root, tmp_path):
    url = join_url(storage_root, "shards", "out.tar")
    (tmp_path / "staging").mkdir()
    with atomic_writer(url, staging_dir=str(tmp_path / "staging")) as handle:
        handle.write(b"part one, ")
        assert not exists(url)
        handle.write(b"part two")
    assert read_bytes(url) == b"part one, part two"
    assert os.listdir(tmp_path / "staging") == []


def test_atomic_writer_leaves_nothing_on_failure(storage_root, tmp_path):
    url = join_url(storage_root, "shards", "out.tar")
    write_bytes_atomic(join_url(storage_root, "shards", "other.tar"), b"keep")
    (tmp_path / "staging").mkdir()
    with pytest.raises(RuntimeError):
        with atomic_writer(url, staging_dir=str(tmp_path / "staging")) as handle:
            handle.write(b"half")
            raise RuntimeError("worker died")
    assert not exists(url)
    assert list_files(storage_root) == [join_url(storage_root, "shards", "other.tar")]
    assert os.listdir(tmp_path / "staging") == []


def test_atomic_writer_keeps_the_old_content_until_commit(storage_root):
    url = join_url(storage_root, "job.json")
    write_bytes_atomic(url, b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_writer(url) as handle:
            handle.write(b"new")
            raise KeyboardInterrupt
    assert read_bytes(url) == b"old"


def test_local_temp_sits_next_to_the_target(tmp_path):
    target = tmp_path / "new" / "dir" / "out.tar"
    with atomic_writer(str(target)) as handle:
        handle.write(b"x")
        (temp,) = os.listdir(target.parent)
        assert PARTIAL.match(temp) and f"-{os.getpid()}-" in temp
        assert os.path.samefile(handle.name, target.parent / temp)
    assert os.listdir(target.parent) == ["out.tar"]
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()


def test_a_writer_that_closes_its_sink_still_commits(tmp_path):
    target = tmp_path / "m.parquet"
    with atomic_writer(str(target)) as handle:
        handle.write(b"written then closed")
        handle.close()
    assert target.read_bytes() == b"written then closed"


def test_list_files_sorted_full_urls_suffix_and_no_temps(storage_root):
    for name in ("m/b.parquet", "m/a.parquet", "m/sub/c.parquet", "m/notes.txt", "mx/z.parquet"):
        put_bytes(join_url(storage_root, name), b"x")
    put_bytes(join_url(storage_root, "m", ".a.parquet.partial-12-0"), b"x")
    expected = [join_url(storage_root, n) for n in ("m/a.parquet", "m/b.parquet", "m/sub/c.parquet")]
    assert list_files(join_url(storage_root, "m"), suffix=".parquet") == expected
    assert len(list_files(join_url(storage_root, "m"))) == 4
    assert list_files(join_url(storage_root, "absent")) == []


def test_listing_and_exists_see_files_written_by_other_processes(s3_bucket):
    prefix = join_url(s3_bucket, "shards")
    write_bytes_atomic(join_url(prefix, "b.tar"), b"x")
    assert list_files(prefix) == [join_url(prefix, "b.tar")]
    s3fs.S3FileSystem().ls(prefix)  # s3fs caches this listing for as long as the instance lives
    other_process = s3fs.S3FileSystem(skip_instance_cache=True)
    other_process.pipe_file(f"{s3_bucket.removeprefix('s3://')}/shards/a.tar", b"x")
    assert exists(join_url(prefix, "a.tar")) and size_of(join_url(prefix, "a.tar")) == 1
    assert list_files(prefix) == [join_url(prefix, "a.tar"), join_url(prefix, "b.tar")]


def test_remove_tree_takes_the_prefix_and_nothing_beside_it(storage_root):
    for name in ("out/a.tar", "out/sub/b.json", "output2/c.tar"):
        put_bytes(join_url(storage_root, name), b"x")
    remove_tree(join_url(storage_root, "out"))
    assert list_files(storage_root) == [join_url(storage_root, "output2/c.tar")]
    remove_tree(join_url(storage_root, "out"))  # already gone: nothing to do
    with pytest.raises(ValueError, match="root"):
        remove_tree("/")


def test_remove_partials_cleans_local_leftovers_only(tmp_path, s3_bucket):
    names = [".out.tar.partial-123-0", ".x.parquet.partial-9-41", ".hidden", "out.tar", "y.partial-1-2"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    assert remove_partials(str(tmp_path)) == 2
    assert sorted(os.listdir(tmp_path)) == [".hidden", "out.tar", "y.partial-1-2"]
    assert remove_partials(str(tmp_path / "absent")) == 0
    put_bytes(join_url(s3_bucket, ".out.tar.partial-1-0"), b"x")
    assert remove_partials(s3_bucket) == 0


def test_failing_s3_read_does_not_leak_the_secret(s3_bucket):
    with pytest.raises(FileNotFoundError) as caught:
        read_bytes(f"{s3_bucket}/{TEST_SECRET}/missing.bin")
    message = str(caught.value)
    assert "missing.bin" in message and TEST_SECRET not in message
    assert caught.value.__suppress_context__ and caught.value.__cause__ is None


def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Get")


@pytest.mark.parametrize("error, transient", [
    (ConnectionResetError(), True),
    (TimeoutError(), True),
    (EndpointConnectionError(endpoint_url="http://x"), True),
    (_client_error("SlowDown", 503), True),
    (_client_error("InternalError", 500), True),
    (_client_error("Throttling", 400), True),
    (_client_error("NoSuchKey", 404), False),
    (_client_error("AccessDenied", 403), False),
    (FileNotFoundError(), False),
    (ValueError(), False),
])
def test_is_transient(error, transient):
    assert is_transient(error) is transient
    wrapped = OSError("translated by s3fs")
    wrapped.__cause__ = error
    assert is_transient(wrapped) is transient


def test_retrying_retries_transient_errors_with_growing_backoff():
    calls, sleeps = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset")
        return "ok"

    assert retrying(flaky, "read", "s3://b/k", sleep=sleeps.append) == "ok"
    assert len(calls) == 3 and sleeps == [storage.BACKOFF_S, 2 * storage.BACKOFF_S]


def test_retrying_gives_up_after_three_attempts_with_a_redacted_error(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", TEST_SECRET)
    calls = []

    def down():
        calls.append(1)
        raise ConnectionRefusedError(f"refused, creds {TEST_SECRET}")

    with pytest.raises(ConnectionError) as caught:
        retrying(down, "read", f"s3://user:{TEST_SECRET}@b/k", sleep=lambda _: None)
    assert len(calls) == storage.ATTEMPTS == 3
    assert TEST_SECRET not in str(caught.value) and "s3://***@b/k" in str(caught.value)


def test_retrying_raises_other_errors_at_once():
    calls = []

    def denied():
        calls.append(1)
        raise _client_error("AccessDenied", 403)

    with pytest.raises(StorageError, match="cannot write s3://b/k: access denied"):
        retrying(denied, "write", "s3://b/k", sleep=lambda _: pytest.fail("slept"))
    assert len(calls) == 1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
