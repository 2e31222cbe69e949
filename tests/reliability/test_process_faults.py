"""Processes killed mid-job: a codec actor mid-shard, and the whole driver (with its embedded Ray).

Each ends with every input sample exactly once in the manifest and the output shards, no
temporary file left, and an archive that ``verify`` passes.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from ncpipe.config import ClusterConfig, CompressConfig
from ncpipe.manifest import read_manifest
from ncpipe.pipeline import jobs
from ncpipe.pipeline.distributor import ProgressLog
from ncpipe.reliability.verify import VerifyOptions, verify_archive
from tests.factories import encoded, kodak_pixels
from tests.helpers import tar_bytes

REPO = Path(__file__).resolve().parents[2]


def _shard(path: Path, prefix: str, count: int, size: tuple[int, int]) -> None:
    members = []
    for i in range(count):
        key = f"{prefix}{i:04d}"
        members += [(f"{key}.png", encoded(kodak_pixels(1 + i % 24, size))), (f"{key}.cls", str(i).encode())]
    path.write_bytes(tar_bytes(members))


def _assert_exactly_once(output: Path, shards: dict[str, int]) -> None:
    """Every input sample has one manifest row and one bitstream; no temporary file anywhere."""
    rows = read_manifest(str(output / "g0000" / "manifest")).to_pylist()
    seen = sorted((Path(r["source_url"]).name, r["sample_index"]) for r in rows)
    assert seen == sorted((name, i) for name, count in shards.items() for i in range(count))
    assert all(r["status"] == "ok" for r in rows)
    assert not [p for p in output.rglob("*") if ".partial" in p.name]


def _verified(output: Path, model: Path) -> None:
    report = verify_archive(str(output), model=str(model), options=VerifyOptions(threads=1))
    assert report.ok, report.text()


def _descendants(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


# -- a codec actor killed mid-shard ---------------------------------------------------------


class _RecordedProgress(ProgressLog):
    instances: list["_RecordedProgress"] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _RecordedProgress.instances.append(self)

    def samples(self) -> int:
        return self.counter.get()


def _compress_actor_workers() -> list[psutil.Process]:
    """This session's CompressActor workers running a shard (descendants of this process only: other
    Ray clusters on the machine are never touched)."""
    found = []
    for process in _descendants(psutil.Process()):
        try:
            if "ray::CompressActor.run" in " ".join(process.cmdline()):  # the one running a shard
                found.append(process)
        except psutil.NoSuchProcess:
            continue
    return found


@pytest.mark.slow
def test_a_codec_actor_killed_mid_shard_is_retried_to_exactly_once(tmp_path, tiny_model_path, ray_local, monkeypatch,
                                                                   caplog):
    count = 160
    (tmp_path / "in").mkdir()
    _shard(tmp_path / "in" / "big.tar", "img", count, (128, 192))
    monkeypatch.setattr(jobs, "ProgressLog", _RecordedProgress)
    _RecordedProgress.instances.clear()
    config = CompressConfig(inputs=(str(tmp_path / "in"),), output=str(tmp_path / "out"), model=str(tiny_model_path),
                            batch_size=4, cluster=ClusterConfig(workers=1, cpus_per_worker=1, executor="ray"))
    outcome: dict = {}
    job = threading.Thread(target=lambda: outcome.update(summary=jobs.run_compress(config)), daemon=True)
    caplog.set_level(logging.INFO, logger="ncpipe.pipeline.jobs")
    job.start()

    deadline = time.monotonic() + 300
    while not (_RecordedProgress.instances and _RecordedProgress.instances[0].samples() > 0):
        assert time.monotonic() < deadline and job.is_alive(), "the job never reported progress"
        time.sleep(0.2)
    samples_at_kill = _RecordedProgress.instances[0].samples()
    (worker,) = _compress_actor_workers()
    worker.send_signal(signal.SIGKILL)
    worker.wait(30)
    job.join(600)
    assert not job.is_alive(), "the job did not finish after the actor was killed"

    summary = outcome["summary"]
    assert summary.complete and summary.samples == count, summary.text()
    assert 0 < samples_at_kill < count  # the kill landed mid-shard
    marker = json.loads((tmp_path / "out" / "g0000" / "_commits" / "big.json").read_text())
    assert marker["attempt"] == 2  # committed by the retry, on the restarted actor
    assert "removed 1 temporary file(s) left by killed writers" in caplog.text  # the first attempt's tar
    _assert_exactly_once(tmp_path / "out", {"big.tar": count})
    _verified(tmp_path / "out", tiny_model_path)


# -- the driver killed mid-job, then the job re-run ----------------------------------------


class _Tracked:
    """A subprocess in its own session, and every process it ever had below it (polled)."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path):
        self.log = log.open("wb")
        self.popen = subprocess.Popen(command, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        self.root = psutil.Process(self.popen.pid)
        self.seen: dict[int, psutil.Process] = {}

    def poll(self) -> int | None:
        for process in _descendants(self.root):
            self.seen.setdefault(process.pid, process)
        return self.popen.poll()

    def kill_everything(self) -> None:
        """SIGKILL the process group and every descendant seen (Ray's workers may sit elsewhere)."""
        self.poll()
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for process in self.seen.values():
            try:
                process.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        self.popen.wait(30)

    def leftovers(self, timeout: float = 30) -> list[psutil.Process]:
        """Descendants still running (pid reuse is told apart by psutil's create-time check)."""
        _, alive = psutil.wait_procs(list(self.seen.values()), timeout=timeout)
        return alive

    def close(self) -> None:
        for process in self.leftovers(timeout=0):
            process.kill()
        self.log.close()


def _compress_command(inputs: Path, output: Path, model: Path) -> list[str]:
    return [sys.executable, "-m", "ncpipe", "compress", str(inputs), "-o", str(output), "-m", str(model),
            "--batch-size", "2", "--workers", "1", "--cpus-per-worker", "1"]


@pytest.mark.slow
def test_the_driver_killed_mid_job_then_rerun_gives_exactly_once(tmp_path, tiny_model_path):
    shards = {f"d-{s}.tar": 6 for s in range(6)}
    (tmp_path / "in").mkdir()
    for s, name in enumerate(shards):
        _shard(tmp_path / "in" / name, f"s{s}-", shards[name], (64, 96))
    output, commits = tmp_path / "out", tmp_path / "out" / "g0000" / "_commits"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    first = _Tracked(_compress_command(tmp_path / "in", output, tiny_model_path), env, tmp_path / "first.log")
    try:
        deadline = time.monotonic() + 400
        while not list(commits.glob("*.json")):
            assert first.poll() is None, (tmp_path / "first.log").read_text()
            assert time.monotonic() < deadline, "no shard was committed in time"
            time.sleep(0.1)
        first.kill_everything()
        assert first.leftovers() == [], "processes of the killed job (its Ray) are still running"
    finally:
        first.close()
    committed = {p.name: json.loads(p.read_text()) for p in commits.glob("*.json")}
    assert 0 < len(committed) < len(shards), "the kill must land mid-job"

    # The re-run also checks that the embedded Ray ignores RAY_ADDRESS (it must never join a
    # cluster it was not told to): pointing it at nothing would make a joining driver fail.
    second = _Tracked(_compress_command(tmp_path / "in", output, tiny_model_path),
                      {**env, "RAY_ADDRESS": "127.0.0.1:9"}, tmp_path / "second.log")
    try:
        deadline = time.monotonic() + 600
        while second.poll() is None:
            assert time.monotonic() < deadline, "the re-run did not finish"
            time.sleep(0.2)
        assert second.popen.returncode == 0, (tmp_path / "second.log").read_text()
        assert second.leftovers() == [], "the re-run's Ray processes outlived it"
    finally:
        second.close()

    for name, marker in committed.items():  # the first run's commits were kept, not redone
        assert json.loads((commits / name).read_text()) == marker
    rerun_jobs = {json.loads(p.read_text())["job_id"] for p in commits.glob("*.json") if p.name not in committed}
    assert len(rerun_jobs) == 1 and not rerun_jobs & {m["job_id"] for m in committed.values()}
    assert f"{len(committed)} already committed" in (tmp_path / "second.log").read_text()
    _assert_exactly_once(output, shards)
    _verified(output, tiny_model_path)
