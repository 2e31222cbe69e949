"""One writer per output: a second job into an output being written is refused at once, naming the
running job; a stale lock is taken over; a job's cleanup removes only its own temporaries."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ncpipe.config import CompressConfig
from ncpipe.io.storage import atomic_writer, create_exclusive, job_temporaries, remove_partials
from ncpipe.io.urls import join_url
from ncpipe.pipeline import jobs
from ncpipe.pipeline.layout import ArchiveLayout
from ncpipe.pipeline.writer_lock import OutputLocked, WriterLock, read_owner
from ncpipe.reliability.verify import VerifyOptions, verify_archive
from tests.factories import encoded, kodak_pixels
from tests.helpers import tar_bytes


def _shard(path: Path, count: int = 3) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tar_bytes([(f"k{i}.png", encoded(kodak_pixels(i + 1, (32, 32)))) for i in range(count)]))
    return str(path)


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _lock_record(job_id: str, host: str, pid: int, heartbeat_age: float) -> bytes:
    now = time.time()
    return json.dumps({"job_id": job_id, "kind": "compress", "host": host, "pid": pid, "started": now - 3600,
                       "heartbeat": now - heartbeat_age}).encode()


def test_a_second_job_is_refused_while_the_first_writes(tmp_path, tiny_model_path, monkeypatch):
    """Job A is held inside its shard work; B into the same output, and B with --overwrite and another
    model, are refused at once naming A; A then completes an archive that is all its own."""
    inputs = (_shard(tmp_path / "in" / "s.tar"),)
    output = str(tmp_path / "archive")
    inside, release = threading.Event(), threading.Event()
    in_process_run_tasks = jobs.run_tasks

    def held_run_tasks(*args, **kwargs):
        inside.set()
        assert release.wait(60)
        return in_process_run_tasks(*args, **kwargs)

    monkeypatch.setattr(jobs, "run_tasks", held_run_tasks)
    first: dict = {}
    job_a = threading.Thread(target=lambda: first.update(summary=jobs.run_compress(
        CompressConfig(inputs=inputs, output=output, model=str(tiny_model_path), metrics=False))))
    job_a.start()
    try:
        assert inside.wait(120), "job A never reached its shards"
        holder = read_owner(ArchiveLayout(output).lock_file)
        started = time.perf_counter()
        with pytest.raises(OutputLocked, match=f"being written by compress job {holder.job_id}"):
            jobs.run_compress(CompressConfig(inputs=inputs, output=output, model=str(tiny_model_path)))
        with pytest.raises(OutputLocked, match=holder.job_id):  # another configuration, --overwrite
            jobs.run_compress(CompressConfig(inputs=inputs, output=output, model="mbt2018-mean-small-l0018",
                                             overwrite=True))
        assert time.perf_counter() - started < 30  # refused at once, not after waiting for A
    finally:
        release.set()
        job_a.join(120)
    summary = first["summary"]
    assert summary.complete and summary.job_id == holder.job_id
    job = json.loads((Path(output) / "g0000" / "job.json").read_text())
    assert job["job_id"] == holder.job_id and job["model"]["id"] == str(tiny_model_path)
    assert not (Path(output) / "_LOCK").exists()  # released
    report = verify_archive(output, model=str(tiny_model_path), options=VerifyOptions(threads=1))
    assert report.ok, report.text()
    monkeypatch.setattr(jobs, "run_tasks", in_process_run_tasks)
    again = jobs.run_compress(CompressConfig(inputs=inputs, output=output, model=str(tiny_model_path), metrics=False))
    assert again.complete and again.shards_skipped == 1  # the lock was released: the next job runs


def test_a_failing_job_releases_its_lock(tmp_path, tiny_model_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("the cluster went away")

    monkeypatch.setattr(jobs, "run_tasks", broken)
    output = tmp_path / "archive"
    with pytest.raises(RuntimeError, match="went away"):
        jobs.run_compress(CompressConfig(inputs=(_shard(tmp_path / "in" / "s.tar"),), output=str(output),
                                         model=str(tiny_model_path)))
    assert not (output / "_LOCK").exists()


def test_stale_locks_are_taken_over_and_live_ones_are_not(tmp_path):
    lock = str(tmp_path / "out" / "_LOCK")
    host = socket.gethostname()
    cases = [  # (holder host, pid, heartbeat age s, refused)
        (host, _dead_pid(), 0, False),  # its process is gone
        (host, os.getpid(), 0, True),  # alive here
        ("another-host", 1, 5, True),  # fresh heartbeat elsewhere
        ("another-host", 1, 3600, False),  # no heartbeat for an hour
    ]
    for holder_host, pid, age, refused in cases:
        Path(lock).parent.mkdir(exist_ok=True)
        Path(lock).write_bytes(_lock_record("20261124T000000Z-0000dead", holder_host, pid, age))
        if refused:
            with pytest.raises(OutputLocked, match="20261124T000000Z-0000dead"):
                WriterLock(lock, "20261124T010101Z-0000new1", "compress").acquire()
            continue
        with WriterLock(lock, "20261124T010101Z-0000new1", "compress"):
            assert read_owner(lock).job_id == "20261124T010101Z-0000new1"
            assert not list(Path(lock).parent.glob("_LOCK.takeover-*"))
        assert not Path(lock).exists()


def test_only_one_of_two_racing_jobs_takes_a_stale_lock(tmp_path):
    lock = str(tmp_path / "_LOCK")
    Path(lock).write_bytes(_lock_record("20261124T000000Z-0000dead", socket.gethostname(), _dead_pid(), 0))
    Path(lock + ".takeover-20261124T000000Z-0000dead").write_bytes(b"another job")  # it is mid take-over
    with pytest.raises(OutputLocked, match="another job is taking over"):
        WriterLock(lock, "20261124T010101Z-0000new1", "compress").acquire()


def test_lock_on_s3_by_conditional_create(faulty_s3):
    url = join_url(faulty_s3.bucket, "archive", "_LOCK")
    assert create_exclusive(url, b"first")
    assert not create_exclusive(url, b"second")
    holder = WriterLock(join_url(faulty_s3.bucket, "other", "_LOCK"), "20261124T010101Z-00000001", "compress")
    with holder:
        with pytest.raises(OutputLocked, match="compress job 20261124T010101Z-00000001"):
            WriterLock(holder.url, "20261124T010102Z-00000002", "compress").acquire()
    with WriterLock(holder.url, "20261124T010102Z-00000002", "compress"):  # released: the next one gets it
        assert read_owner(holder.url).job_id == "20261124T010102Z-00000002"


def test_local_conditional_create_has_one_winner(tmp_path):
    url = str(tmp_path / "_LOCK")
    results: list[bool] = []
    threads = [threading.Thread(target=lambda i=i: results.append(create_exclusive(url, str(i).encode())))
               for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 7 + [True]
    assert not [p for p in os.listdir(tmp_path) if ".partial" in p]


def test_temporaries_carry_the_job_and_cleanup_removes_only_its_own(tmp_path):
    job_a, job_b = "20261124T010101Z-aaaaaaaa", "20261124T010101Z-bbbbbbbb"
    with job_temporaries(job_a), atomic_writer(str(tmp_path / "x.tar")) as handle:
        name = os.path.basename(handle.name)
    assert name.startswith(f".x.tar.partial-{job_a}-{os.getpid()}-")
    for job in (job_a, job_b):  # what writers of two jobs killed mid-write leave
        (tmp_path / f".x.tar.partial-{job}-{os.getpid()}-0").write_bytes(b"half")
    assert remove_partials(str(tmp_path), job_a) == 1
    assert sorted(os.listdir(tmp_path)) == sorted([f".x.tar.partial-{job_b}-{os.getpid()}-0", "x.tar"])
