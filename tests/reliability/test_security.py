"""Security defaults: loopback-only embedded Ray, weights-only checkpoints, digests, no secrets in outputs."""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
from pathlib import Path

import fsspec
import psutil
import pytest
import ray
import torch

from ncpipe.config import CompressConfig
from ncpipe.manifest import read_manifest
from ncpipe.models.checkpoint import CheckpointError, read_checkpoint
from ncpipe.models.registry import load_model
from ncpipe.pipeline.jobs import run_compress
from tests.factories import encoded, kodak_pixels
from tests.helpers import tar_bytes
from tests.reliability.support import FAULT_ACCESS_KEY_ID, FAULT_SECRET

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def test_the_embedded_ray_listens_on_loopback_only_and_runs_no_dashboard(ray_local):
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    ours = {p.pid for p in psutil.Process().children(recursive=True)} | {psutil.Process().pid}
    listening = [c for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN and c.pid in ours]
    ray_processes = {c.pid for c in listening if c.pid != psutil.Process().pid}
    assert ray_processes, "no Ray process found listening: the check would be vacuous"
    exposed = [(c.laddr, psutil.Process(c.pid).name()) for c in listening if c.laddr.ip not in LOOPBACK]
    assert exposed == [], f"listening beyond loopback: {exposed}"
    # include_dashboard=False leaves Ray's minimal dashboard head (usage stats, no frontend):
    # it must be bound to loopback too (its sockets are among those checked above).
    for pid in ours:
        command = psutil.Process(pid).cmdline()
        if any(part.endswith("dashboard/dashboard.py") for part in command):
            assert "--host=127.0.0.1" in command and "--disable-frontend" in command, command


class _RunsCodeOnLoad:
    """Unpickling this calls ``Path.write_text``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.write_text, (self.marker, "code ran")


def test_a_checkpoint_carrying_a_pickled_object_is_refused_without_running_it(tmp_path, tiny_model_path):
    marker = tmp_path / "pwned"
    checkpoint = torch.load(tiny_model_path, weights_only=True)
    checkpoint["provenance"] = {"note": _RunsCodeOnLoad(marker)}
    path = tmp_path / "evil.pt"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="not a loadable weights-only checkpoint"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError):
        load_model(str(path))
    assert not marker.exists()
    torch.load(path, weights_only=False)  # what ncpipe does not do: the payload is real
    assert marker.read_text() == "code ran"


def _registry_copy(root: Path, model: Path, name: str, sha256: str) -> None:
    directory = root / name
    directory.mkdir(parents=True)
    shutil.copy(model, directory / "model.pt")
    (directory / "card.json").write_text(json.dumps({"name": name, "sha256": sha256}))


def test_a_registry_model_whose_digest_does_not_match_its_card_is_refused(tmp_path, tiny_model_path, monkeypatch):
    from ncpipe.models.checkpoint import load_codec_model

    real = load_codec_model(tiny_model_path).identity.sha256
    _registry_copy(tmp_path / "registry", tiny_model_path, "good", real)
    _registry_copy(tmp_path / "registry", tiny_model_path, "wrong-card", "0" * 64)
    tampered = torch.load(tiny_model_path, weights_only=True)
    name = next(k for k, v in tampered["state_dict"].items() if v.is_floating_point() and v.numel() > 1)
    tampered["state_dict"][name] = tampered["state_dict"][name].clone()
    tampered["state_dict"][name].view(-1)[0] += 1e-3
    _registry_copy(tmp_path / "registry", tiny_model_path, "tampered", real)
    torch.save(tampered, tmp_path / "registry" / "tampered" / "model.pt")
    monkeypatch.setenv("NCPIPE_MODEL_DIRS", str(tmp_path / "registry"))

    assert load_model("good").identity.sha256 == real
    with pytest.raises(CheckpointError, match=f"but {'0' * 64} was expected"):
        load_model("wrong-card")
    with pytest.raises(CheckpointError, match=f"but {real} was expected"):
        load_model("tampered")


def _presigned_get(endpoint: str, bucket: str, key: str) -> str:
    """An HTTP URL that carries its credentials in the query string (AWS signature v4)."""
    import botocore.session
    from botocore.config import Config

    client = botocore.session.get_session().create_client("s3", endpoint_url=endpoint,
                                                          config=Config(signature_version="s3v4"))
    return client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=600)


def test_no_credentials_in_logs_manifests_or_job_files(faulty_s3, tiny_model_path, tmp_path, caplog):
    """Output on S3 with credentials in the environment, a failure whose message carries the access
    key id, and an input given as a presigned URL: none of it may reach a log, manifest or job file."""
    (tmp_path / "in").mkdir()
    members = [(f"k{i}.png", encoded(kodak_pixels(1 + i, (64, 64)))) for i in range(2)]
    (tmp_path / "in" / "a.tar").write_bytes(tar_bytes(members))
    fsspec.filesystem("s3").pipe_file(f"{faulty_s3.bucket}/in/b.tar", tar_bytes(members))
    signed = _presigned_get(faulty_s3.endpoint, faulty_s3.bucket.removeprefix("s3://"), "in/b.tar")
    assert "X-Amz-Signature=" in signed and "X-Amz-Credential=" in signed
    output = f"{faulty_s3.bucket}/archive"
    faulty_s3.faults.fail("PUT", r"/shards/a\.tar$", 403, "AccessDenied", times=1)
    config = CompressConfig(inputs=(str(tmp_path / "in" / "a.tar"), signed), output=output,
                            model=str(tiny_model_path), metrics=False)
    with caplog.at_level(logging.DEBUG):
        first = run_compress(config)
        second = run_compress(config)
    assert first.shards_failed and second.complete  # the failure happened and was logged
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith(("ncpipe", "tests.")))
    assert "AccessDenied" in logged
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    written = b"".join(fs.cat_file(p) for p in fs.find(output.removeprefix("s3://")))
    rows = read_manifest(f"{output}/g0000/manifest").to_pylist()
    assert any("X-Amz-Signature=***" in r["source_url"] for r in rows)
    for text, where in [(logged.encode(), "logs"), (written, "archive objects"),
                        (first.text().encode() + second.text().encode(), "summaries")]:
        for secret in (FAULT_SECRET, FAULT_ACCESS_KEY_ID):
            assert secret.encode() not in text, f"{secret} found in {where}"
