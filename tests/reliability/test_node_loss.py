"""A Ray cluster of several nodes loses the node running the codec actor mid-shard: the job still
completes, every sample exactly once, and the archive verifies.

The cluster is three raylets on this machine (``ray.cluster_utils.Cluster``): a head without CPUs
(so no actor can land there) and two one-CPU worker nodes; the job's driver runs as
``ncpipe compress --address`` in its own process, as a user would run it against a cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ncpipe.manifest import read_manifest
from ncpipe.reliability.verify import VerifyOptions, verify_archive
from tests.factories import encoded, kodak_pixels
from tests.helpers import tar_bytes

REPO = Path(__file__).resolve().parents[2]
COUNT = 600  # about 10 s of coding on one CPU: a window wide enough to land the kill in, under load too


def _shard(path: Path) -> None:
    members = []
    for i in range(COUNT):
        members += [(f"img{i:04d}.png", encoded(kodak_pixels(1 + i % 24, (96, 128)))), (f"img{i:04d}.cls", b"1")]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tar_bytes(members))


def _running_node(cluster):
    """The worker node whose raylet has the ``CompressActor.run`` worker among its descendants, or None."""
    for node in cluster.worker_nodes:
        raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
        for process in raylet.children(recursive=True):
            try:
                if "ray::CompressActor.run" in " ".join(process.cmdline()):
                    return node
            except psutil.NoSuchProcess:
                continue
    return None


def _shard_under_way(output: Path) -> bool:
    """The shard's output is being written (its temporary exists) and is not committed."""
    generation = output / "g0000"
    return any(generation.glob("shards/.big.tar.partial-*")) and not (generation / "_commits" / "big.json").exists()


@pytest.mark.slow
def test_losing_the_node_of_the_codec_actor_mid_shard(tmp_path, tiny_model_path):
    import ray
    from ray.cluster_utils import Cluster

    # Earlier tests leave an embedded Ray in this process; the cluster below must be the only one it knows.
    ray.shutdown()
    _shard(tmp_path / "in" / "big.tar")
    output = tmp_path / "out"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        env = {**os.environ, "RAY_ADDRESS": ""}
        driver = subprocess.Popen(
            [sys.executable, "-m", "ncpipe", "compress", str(tmp_path / "in" / "big.tar"), "-o", str(output),
             "--model", str(tiny_model_path), "--address", cluster.address, "--workers", "1",
             "--cpus-per-worker", "1", "--batch-size", "4", "--no-metrics"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 150
        node = None
        while node is None or not _shard_under_way(output):
            if driver.poll() is not None:
                pytest.fail(f"the job ended (exit {driver.returncode}) before the kill landed:\n{driver.stdout.read()}")
            assert time.monotonic() < deadline, "the shard never got under way"
            node = _running_node(cluster)
            time.sleep(0.05)
        cluster.remove_node(node, allow_graceful=False)
        assert not (output / "g0000" / "_commits" / "big.json").exists()  # the kill landed mid-shard
        log, _ = driver.communicate(timeout=600)
        assert driver.returncode == 0, log
    finally:
        cluster.shutdown()

    marker = json.loads((output / "g0000" / "_commits" / "big.json").read_text())
    assert marker["attempt"] >= 2, marker  # committed by a retry, on the surviving node
    rows = read_manifest(str(output / "g0000" / "manifest")).to_pylist()
    assert sorted(r["sample_index"] for r in rows) == list(range(COUNT))
    assert all(r["status"] == "ok" for r in rows)
    assert not [p for p in output.rglob("*") if ".partial" in p.name or p.name == "_LOCK"]
    report = verify_archive(str(output), model=str(tiny_model_path), options=VerifyOptions(threads=1))
    assert report.ok, report.text()
