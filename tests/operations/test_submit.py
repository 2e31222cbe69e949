"""``ncpipe submit`` / ``ncpipe job``: planning here, then a real Ray head on loopback with the Jobs API.

The head is started once for the module (``ray start --head --block`` in its own session and
temp dir, token authentication on, every address on 127.0.0.1) and stopped by its pid. The
CLI runs as subprocesses, as a user would run it, with a decoy ``RAY_ADDRESS`` that
``--address`` must win over.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ncpipe.cli import main
from ncpipe.config import ConfigError
from ncpipe.operations.submission import (
    DEFAULT_EXCLUDES,
    SubmissionError,
    plan_submission,
    resolve_address,
    submit,
    upload_files,
)
from tests.factories import encoded, kodak_pixels
from tests.helpers import tar_bytes

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TOKEN = "ncpipe-test-token-4f1c2b9e7d3a"  # this module's head only
DECOY_RAY_ADDRESS = "127.0.0.1:9"  # nothing listens there: a client that used it would fail


def write_spec(root: Path, name: str, text: str) -> Path:
    path = root / "jobs" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# -- planning a submission (no cluster) -------------------------------------------------------------


def test_plan_runs_the_spec_from_the_uploaded_working_dir(tmp_path):
    spec = write_spec(tmp_path, "my job.yaml", "kind: compress\nspec: {inputs: [data/x.tar], output: s3://b/a}")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.tar").write_bytes(b"x" * 100)
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "big").write_bytes(b"x" * 1000)
    plan = plan_submission(spec, tmp_path, pip=("pillow-avif-plugin",), excludes=("*.ckpt",))
    assert plan.entrypoint == "python -m ncpipe run 'jobs/my job.yaml'"
    assert plan.runtime_env == {"working_dir": str(tmp_path), "excludes": [*DEFAULT_EXCLUDES, "*.ckpt"],
                                "pip": ["pillow-avif-plugin"]}
    assert plan.upload_files == 2 and plan.upload_bytes == 100 + spec.stat().st_size
    assert plan.warnings == []


def test_plan_warns_about_absolute_local_paths(tmp_path):
    spec = write_spec(tmp_path, "j.yaml", "kind: compress\nspec: {inputs: [/data/x.tar], output: s3://b/a, "
                      "model: /models/m.pt}")
    warnings = plan_submission(spec, tmp_path).warnings
    assert [w.split(" ")[0] for w in warnings] == ["/data/x.tar", "/models/m.pt"]
    assert "on the cluster's nodes" in warnings[0]


def test_a_relative_output_is_flagged_and_output_sends_the_job_elsewhere(tmp_path, capsys):
    """A submitted job's relative output lands in Ray's temporary package folder on the head."""
    spec = write_spec(tmp_path, "j.yaml", "kind: compress\nspec: {inputs: [data/x.tar], output: out/archive}")
    (warning,) = plan_submission(spec, tmp_path).warnings
    assert warning.startswith("output out/archive is relative") and "--output" in warning
    (warning,) = plan_submission(spec, tmp_path, output="/srv/archive").warnings
    assert warning == "output /srv/archive is an absolute local path: the job writes it on the cluster's nodes"
    plan = plan_submission(spec, tmp_path, output="s3://bucket/archive")
    assert plan.warnings == [] and plan.entrypoint == "python -m ncpipe run jobs/j.yaml --output s3://bucket/archive"
    assert main(["run", str(spec), "--check", "--output", "s3://bucket/archive"]) == 0
    assert json.loads(capsys.readouterr().out)["spec"]["output"] == "s3://bucket/archive"
    evaluate = write_spec(tmp_path, "e.yaml", "kind: train-codec\nspec: {data: [d], run_dir: r}")
    with pytest.raises(ConfigError, match="has no output to replace"):
        plan_submission(evaluate, tmp_path, output="s3://bucket/x")


def test_submit_waits_for_a_starting_heads_job_agent(tmp_path):
    """A new head's dashboard answers before its job agent does: the Jobs API says so with a 500."""
    spec = write_spec(tmp_path, "j.yaml", "kind: compress\nspec: {inputs: [a], output: s3://b/o}")
    plan = plan_submission(spec, tmp_path)

    class StartingHead:
        calls = 0

        def submit_job(self, **request):
            self.calls += 1
            if self.calls < 3:
                raise RuntimeError("Request failed with status code 500: No available agent to submit job, "
                                   "please try again later..")
            return "raysubmit_1"

    head, slept = StartingHead(), []
    assert submit(head, plan, sleep=slept.append) == "raysubmit_1" and slept == [5.0, 5.0]

    class DownHead:
        def submit_job(self, **request):
            raise RuntimeError("Request failed with status code 404: Not Found")

    with pytest.raises(SubmissionError, match="404"):
        submit(DownHead(), plan, sleep=lambda s: pytest.fail("waited"))


def test_plan_refuses_a_spec_outside_or_excluded_from_the_upload(tmp_path):
    inside = tmp_path / "wd"
    inside.mkdir()
    outside = write_spec(tmp_path, "j.yaml", "kind: compress\nspec: {inputs: [a], output: o}")
    with pytest.raises(SubmissionError, match="is outside --working-dir"):
        plan_submission(outside, inside)
    excluded = tmp_path / "out" / "j.yaml"
    excluded.parent.mkdir()
    excluded.write_text(outside.read_text())
    with pytest.raises(SubmissionError, match="is excluded from the upload"):
        plan_submission(excluded, tmp_path)


def test_plan_validates_the_spec_before_anything_is_sent(tmp_path):
    spec = write_spec(tmp_path, "j.yaml", "kind: compress\nspec: {inputs: [a], output: o, workers: 2}")
    with pytest.raises(ConfigError, match=r"j\.yaml: spec\.workers: unknown field"):
        plan_submission(spec, tmp_path)


def test_plan_refuses_an_upload_over_the_limit_naming_the_largest_files(tmp_path):
    spec = write_spec(tmp_path, "j.yaml", "kind: compress\nspec: {inputs: [a], output: o}")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 3 * 2**20)
    (tmp_path / "ignored.bin").write_bytes(b"\0" * 3 * 2**20)
    (tmp_path / ".gitignore").write_text("# comment\n/ignored.bin\n")
    with pytest.raises(SubmissionError, match=r"holds 3 MiB to upload, over Ray's limit of 2 MiB; "
                       r"largest: weights\.bin \(3 MiB\)"):
        plan_submission(spec, tmp_path, limit_bytes=2 * 2**20)


def test_the_repository_itself_uploads_within_rays_limit():
    files = dict(upload_files(REPO_ROOT, DEFAULT_EXCLUDES))
    assert "ncpipe/operations/submission.py" in files and "jobs/compress-samples.yaml" in files
    assert not [name for name in files if name.startswith((".git/", ".venv/", "out/", "runs/"))]
    assert sum(files.values()) < 256 * 2**20


def test_an_explicit_address_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "ray-address:6379")
    assert resolve_address("http://head:8265") == "http://head:8265"
    assert resolve_address(None) == "ray-address:6379"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://api:8265")
    assert resolve_address(None) == "http://api:8265"
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS")
    with pytest.raises(SubmissionError, match="pass --address http://HEAD:8265"):
        resolve_address(None)


# -- a real Ray head --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Head:
    url: str
    temp_dir: str


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the cluster's `python` is this venv's
    return env


def wait_for_dashboard(url: str, head: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    request = urllib.request.Request(f"{url}/api/version", headers={"Authorization": f"Bearer {TOKEN}"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.poll() is not None:
            pytest.fail(f"ray start exited with {head.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"the dashboard at {url} did not answer within {timeout:.0f}s:\n{log.read_text()[-3000:]}")


def stop_session(head: subprocess.Popen) -> None:
    """SIGTERM ``ray start --block`` (it stops what it started), then SIGKILL any process left in its session."""
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        head.kill()
        head.wait()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == head.pid:
                    os.kill(int(entry), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    gcs, dashboard, client, agent = free_ports(4)
    temp_dir = tempfile.mkdtemp(prefix="ncr", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    log = tmp_path_factory.mktemp("ray-head") / "head.log"
    env = base_env() | {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Ray then keeps every address on 127.0.0.1
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN,
    }
    command = [
        str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", f"--port={gcs}", "--include-dashboard=true",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}", "--num-cpus=1", "--num-gpus=0", f"--temp-dir={temp_dir}",
    ]
    with open(log, "w") as output:
        head = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{dashboard}"
        wait_for_dashboard(url, head, log)
        yield Head(url, temp_dir)
    finally:
        stop_session(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def ncpipe(*args: str, env: dict[str, str] | None = None, timeout: float = 420) -> subprocess.CompletedProcess:
    """The real CLI as a user runs it, authenticated, with a decoy RAY_ADDRESS."""
    env = env or base_env() | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN, "RAY_ADDRESS": DECOY_RAY_ADDRESS}
    result = subprocess.run([str(BIN / "ncpipe"), *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert TOKEN not in result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def working_dir(tmp_path_factory, tiny_model_path) -> Path:
    """What a user uploads: the ncpipe package, job specs, a tiny model and shard by relative path."""
    root = tmp_path_factory.mktemp("wd")
    shutil.copytree(REPO_ROOT / "ncpipe", root / "ncpipe", ignore=shutil.ignore_patterns("__pycache__", "*.nb[ic]"))
    (root / "tiny").mkdir()
    shutil.copy(tiny_model_path, root / "tiny" / "model.pt")
    (root / "data").mkdir()
    members = []
    for i in range(4):
        members += [(f"k{i}.png", encoded(kodak_pixels(i + 1, (64, 64)))), (f"k{i}.cls", str(i).encode())]
    (root / "data" / "tiny-000000.tar").write_bytes(tar_bytes(members))
    for name, output in (("compress-tiny.yaml", "archive"), ("compress-stopped.yaml", "stopped")):
        write_spec(root, name, f"""
kind: compress
spec:
  inputs: [data/tiny-000000.tar]
  output: {root.parent / output}
  model: tiny/model.pt
  batch_size: 2
  device: cpu
cluster: {{workers: 1}}
""")
    write_spec(root, "broken.yaml",
               "kind: compress\nspec: {inputs: [data/missing.tar], output: o, model: tiny/model.pt}")
    return root


@pytest.fixture(scope="module")
def finished_job(ray_head, working_dir):
    result = ncpipe("submit", str(working_dir / "jobs" / "compress-tiny.yaml"), "--address", ray_head.url,
                    "--working-dir", str(working_dir))
    return result, result.stdout.splitlines()[0] if result.stdout else ""


@pytest.mark.slow
def test_submit_runs_the_uploaded_ncpipe_and_follows_the_job_to_success(finished_job, ray_head, working_dir):
    result, submission_id = finished_job
    assert result.returncode == 0, result.stdout + result.stderr
    assert submission_id.startswith("raysubmit_")
    out = result.stdout
    # the job's own log, streamed: it ran the uploaded copy of ncpipe, not the one installed here
    assert f"from {ray_head.temp_dir}/session_" in out and "/runtime_resources/working_dir_files/" in out
    assert "samples     4: 4 ok, 0 error rows" in out
    assert out.rstrip().splitlines()[-1] == f"{submission_id} SUCCEEDED"
    assert "is an absolute local path: the job writes it on the cluster's nodes" in result.stderr
    archive = working_dir.parent / "archive"
    assert (archive / "CURRENT").read_text() == "g0000\n"
    rows = pq.read_table(archive / "g0000" / "manifest" / "tiny-000000.parquet").to_pylist()
    assert [row["status"] for row in rows] == ["ok"] * 4
    assert json.loads((archive / "g0000" / "job.json").read_text())["config"]["model"] == "tiny/model.pt"


@pytest.mark.slow
def test_job_status_and_logs_of_a_finished_job(finished_job, ray_head):
    _, submission_id = finished_job
    api_env = base_env() | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN, "RAY_API_SERVER_ADDRESS": ray_head.url}
    status = ncpipe("job", "status", submission_id, env=api_env)  # the address from the environment
    assert status.returncode == 0 and status.stdout.startswith(f"{submission_id} SUCCEEDED")
    logs = ncpipe("job", "logs", submission_id, "--address", ray_head.url)
    assert logs.returncode == 0 and "samples     4: 4 ok, 0 error rows" in logs.stdout


@pytest.mark.slow
def test_a_failing_job_is_followed_to_exit_status_1_with_its_error(ray_head, working_dir):
    submitted = ncpipe("submit", str(working_dir / "jobs" / "broken.yaml"), "--no-wait",
                       "--address", ray_head.url, "--working-dir", str(working_dir))
    assert submitted.returncode == 0, submitted.stderr
    submission_id = submitted.stdout.strip()
    followed = ncpipe("job", "logs", submission_id, "--follow", "--address", ray_head.url)
    assert followed.returncode == 1
    assert "input data/missing.tar does not exist" in followed.stdout
    assert f"{submission_id} FAILED" in followed.stdout
    status = ncpipe("job", "status", submission_id, "--address", ray_head.url)
    assert status.returncode == 1 and "FAILED" in status.stdout


@pytest.mark.slow
def test_a_stopped_job_ends_stopped(ray_head, working_dir):
    submission_id = f"ncpipe-test-stop-{os.getpid()}"
    submitted = ncpipe("submit", str(working_dir / "jobs" / "compress-stopped.yaml"), "--no-wait",
                       "--submission-id", submission_id, "--address", ray_head.url, "--working-dir", str(working_dir))
    assert submitted.returncode == 0 and submitted.stdout.strip() == submission_id, submitted.stderr
    stopped = ncpipe("job", "stop", submission_id, "--address", ray_head.url)
    assert stopped.returncode == 0 and stopped.stdout.strip() == f"{submission_id} stop requested"
    followed = ncpipe("job", "logs", submission_id, "--follow", "--address", ray_head.url)
    assert followed.returncode == 1 and f"{submission_id} STOPPED" in followed.stdout
    assert not (working_dir.parent / "stopped" / "CURRENT").exists()


@pytest.mark.slow
def test_unknown_jobs_and_unreachable_clusters_exit_2_with_a_message(ray_head):
    unknown = ncpipe("job", "status", "raysubmit_doesnotexist", "--address", ray_head.url)
    assert unknown.returncode == 2 and "cannot get job raysubmit_doesnotexist" in unknown.stderr
    (closed,) = free_ports(1)
    unreachable = ncpipe("job", "status", "x", "--address", f"http://127.0.0.1:{closed}")
    assert unreachable.returncode == 2 and f"cannot connect to http://127.0.0.1:{closed}" in unreachable.stderr
