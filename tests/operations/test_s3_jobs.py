"""S3 to S3 and back through the real CLI, a real local Ray and the loopback S3 server.

One flow, because each job start costs an actor and a model load here:

1. ``ncpipe run SPEC`` compresses two shards from ``s3://`` into an ``s3://`` archive with one
   attempt per shard on Ray actors; the worker is SIGKILLed (a crash, an OOM kill) while it writes the second
   shard's output;
2. ``ncpipe compress`` re-runs the same configuration: the committed shard is skipped, the
   killed one redone;
3. ``ncpipe decompress`` restores the archive to ``s3://``.

Then: nothing of the killed shard was ever visible under a final name, the restore matches the
inputs, and neither the secret key nor the access key id occurs in any log line, printed
summary or object written.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import signal
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ncpipe.cli import main
from tests.conftest import TEST_ACCESS_KEY_ID, TEST_SECRET
from tests.factories import encoded, kodak_pixels
from tests.helpers import tar_bytes

SAMPLES_PER_SHARD = (3, 16)
EXTRA_MEMBER = bytes(range(256)) * 32  # 8 KiB per sample: the killed shard's temp grows visibly
KILL_AFTER_BYTES = 3 * len(EXTRA_MEMBER)  # at least three samples written, more to come


def shard_members(shard: int) -> list[tuple[str, bytes]]:
    members = []
    for i in range(SAMPLES_PER_SHARD[shard]):
        key = f"s{shard}/img{i:03d}"
        members += [
            (f"{key}.png", encoded(kodak_pixels(1 + (shard * 7 + i) % 24, (64, 64 + 16 * (i % 2))))),
            (f"{key}.json", json.dumps({"shard": shard, "i": i}).encode()),
            (f"{key}.txt", EXTRA_MEMBER),
        ]
    return members


@dataclass
class Killed:
    """The worker killed while its staged output grew: which temp file, which process, how big."""

    path: str | None = None
    pid: int | None = None
    size: int = 0
    seen: list[str] = field(default_factory=list)


def kill_while_staging(stem: str, killed: Killed, stop: threading.Event) -> None:
    """SIGKILL the process whose local staging file for ``<stem>.tar`` holds KILL_AFTER_BYTES or more.

    Temp names are ``.<name>.partial-<pid>-<n>`` (ncpipe.io.storage), so the pid is the writer's.
    """
    pattern = os.path.join(tempfile.gettempdir(), f".{stem}.tar.partial-*")
    while not stop.is_set():
        for path in glob.glob(pattern):
            try:
                size = os.path.getsize(path)
            except FileNotFoundError:
                continue
            killed.seen.append(path)
            if size >= KILL_AFTER_BYTES:
                killed.path, killed.pid, killed.size = path, int(path.rsplit("-", 2)[-2]), size
                os.kill(killed.pid, signal.SIGKILL)
                return
        time.sleep(0.005)


def bucket_objects(bucket: str) -> dict[str, bytes]:
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    return {path: fs.cat_file(path) for path in fs.find(bucket.removeprefix("s3://"))}


def readable_text(key: str, data: bytes) -> bytes:
    """An object's bytes, plus the decoded rows and key-value metadata of a (compressed) Parquet file."""
    if not key.endswith(".parquet"):
        return data
    table = pq.read_table(io.BytesIO(data))
    metadata = b" ".join(k + b"=" + v for k, v in (table.schema.metadata or {}).items())
    return data + json.dumps(table.to_pylist(), default=str).encode() + metadata


def tar_members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive.getmembers()}


@pytest.mark.slow
def test_s3_compress_kill_resume_restore_atomic_and_without_credentials(
    s3_server, ray_with_s3_env, tiny_model_path, tmp_path, capfd, caplog
):
    fs = fsspec.filesystem("s3")
    bucket = f"s3://ncpipe-ops-{os.getpid()}"
    fs.mkdir(bucket.removeprefix("s3://"))
    stems = [f"ops-{os.getpid()}-{shard:06d}" for shard in range(2)]
    inputs = {stem: shard_members(shard) for shard, stem in enumerate(stems)}
    for stem, members in inputs.items():
        fs.pipe_file(f"{bucket}/in/{stem}.tar".removeprefix("s3://"), tar_bytes(members))
    archive, restored = f"{bucket}/archive", f"{bucket}/restored"
    spec = tmp_path / "compress-s3.yaml"
    spec.write_text(f"""
kind: compress
spec:
  inputs: [{bucket}/in/]
  output: {archive}
  model: {tiny_model_path}
  batch_size: 2
  device: cpu
cluster:
  workers: 1
  max_shard_attempts: 1
  executor: ray
""")
    caplog.set_level(logging.INFO)
    killed, stop = Killed(), threading.Event()
    watcher = threading.Thread(target=kill_while_staging, args=(stems[1], killed, stop), daemon=True)
    watcher.start()
    try:
        first = main(["run", str(spec)])
        stop.set()
        watcher.join()
        after_kill = bucket_objects(bucket)
        second = main(["compress", f"{bucket}/in/", "-o", archive, "-m", str(tiny_model_path),
                       "--batch-size", "2", "--device", "cpu"])
        third = main(["decompress", archive, "-o", restored, "-m", str(tiny_model_path), "--device", "cpu"])
    finally:
        stop.set()
        for path in set(killed.seen):  # a SIGKILLed writer cannot remove its local staging file
            if os.path.exists(path):
                os.unlink(path)
    printed = capfd.readouterr()

    # 1. The worker was killed mid-write; the shard failed and left nothing under a final name.
    assert killed.pid is not None, f"the second shard's staged output never reached {KILL_AFTER_BYTES} bytes"
    assert first == 1 and f"FAILED      {bucket}/in/{stems[1]}.tar" in printed.out
    generation = f"{archive}/g0000".removeprefix("s3://")
    assert f"{generation}/shards/{stems[0]}.tar" in after_kill
    assert f"{generation}/_commits/{stems[0]}.json" in after_kill
    for final in (f"shards/{stems[1]}.tar", f"manifest/{stems[1]}.parquet", f"_commits/{stems[1]}.json"):
        assert f"{generation}/{final}" not in after_kill
    assert not [key for key in after_kill if ".partial" in key]
    assert f"{archive}/CURRENT".removeprefix("s3://") not in after_kill
    assert f"{generation}/summary.json" not in after_kill

    # 2. The re-run skipped the committed shard and completed the archive.
    assert second == 0 and "shards      2 (1 already committed, 0 failed)" in printed.out
    objects = bucket_objects(bucket)
    assert objects[f"{archive}/CURRENT".removeprefix("s3://")] == b"g0000\n"
    manifest = pq.read_table(io.BytesIO(objects[f"{generation}/manifest/{stems[1]}.parquet"])).to_pylist()
    assert [row["status"] for row in manifest] == ["ok"] * SAMPLES_PER_SHARD[1]

    # 3. The restore holds every sample: a PNG of the right size and every other member unchanged.
    assert third == 0 and f"samples     {sum(SAMPLES_PER_SHARD)}: {sum(SAMPLES_PER_SHARD)} restored" in printed.out
    for stem, members in inputs.items():
        restored_members = tar_members(objects[f"{restored}/{stem}.tar".removeprefix("s3://")])
        for name, data in members:
            if name.endswith(".png"):
                original, back = Image.open(io.BytesIO(data)), Image.open(io.BytesIO(restored_members[name]))
                assert back.size == original.size and np.asarray(back).std() > 0
            else:
                assert restored_members[name] == data

    # No credential anywhere: logs (ours and the workers' forwarded by Ray), summaries, objects.
    for secret in (TEST_SECRET, TEST_ACCESS_KEY_ID):
        for name, text in (("stdout", printed.out), ("stderr", printed.err), ("log records", caplog.text)):
            assert secret not in text, f"{secret!r} in {name}"
        for key, data in objects.items():
            assert secret.encode() not in readable_text(key, data), f"{secret!r} in s3://{key}"
    assert "2 input shards: 2 to compress" in caplog.text  # the log checked is the jobs' log
