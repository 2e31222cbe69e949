"""How a compress job's cost grows with its number of shards.

    python -m benchmarks.scale --images ../shared/data/kodak --model mbt2018-mean-small-l0018 --shards 200,2000 \
        [--executor auto|ray|in-process]

Each size runs in a fresh Python process (so the driver's peak memory is that job's alone): N shards of
``--per-shard`` tiny images (crops of the given images) compressed by ``run_compress`` with the default
cluster plan and ``--executor`` (default auto: here, one worker in the job's process; ``ray``: actors on
an embedded Ray). Reported per size, from the commit markers' times and the workers' own seconds:

* first commit: seconds from the job's start to its first committed shard (Ray if any, actors, first batch);
* shards/s: committed shards per second between the first and the last commit (steady state);
* per-shard overhead: the seconds an actor spends per shard outside its worker (the driver handing out
  the shard, Ray's calls, result collection): interval between commits x actors - worker seconds per shard,
  both without each actor's first shard (its warm-up); near 0 it can come out slightly negative;
* tail: seconds from the last commit to the summary being returned (listing, summarising);
* driver peak memory: the driver process's peak resident set during the job, and its growth over the job
  (in-process, the worker's memory is the driver's).

The last line gives the largest size's figures as ratios of the smallest's (flat: 1.00).
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image


def rss_bytes() -> int:
    """The resident set of this process now (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class PeakMemory:
    """Samples this process's resident set on a thread; ``peak`` over the ``with`` block."""

    def __init__(self, every: float = 0.05):
        self.every, self.peak, self.stop = every, 0, threading.Event()

    def __enter__(self) -> "PeakMemory":
        self.start = rss_bytes()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self.stop.wait(self.every)

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, rss_bytes())


def tiny_pngs(images: Path, count: int, size: tuple[int, int]) -> list[bytes]:
    """``count`` distinct PNG crops (height, width) of the images in a directory."""
    sources = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(images.glob("*.png"))]
    h, w = size
    crops = []
    for i in range(count):
        source = sources[i % len(sources)]
        top = (i * 7 * h) % (source.shape[0] - h)
        left = (i * 13 * w) % (source.shape[1] - w)
        buffer = io.BytesIO()
        Image.fromarray(source[top : top + h, left : left + w]).save(buffer, format="PNG")
        crops.append(buffer.getvalue())
    return crops


def write_tiny_shards(directory: Path, shards: int, per_shard: int, pngs: list[bytes]) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    urls = []
    for s in range(shards):
        path = directory / f"scale-{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                data = pngs[(s * per_shard + i) % len(pngs)]
                info = tarfile.TarInfo(f"s{s:06d}-{i}.png")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        urls.append(str(path))
    return urls


def one_size(args: argparse.Namespace, shards: int) -> dict:
    """One job of ``shards`` shards in this process."""
    from ncpipe.config import ClusterConfig, CompressConfig
    from ncpipe.pipeline.jobs import run_compress

    cluster = ClusterConfig(executor=args.executor)
    with tempfile.TemporaryDirectory() as tmp:
        pngs = tiny_pngs(args.images, min(shards * args.per_shard, 512), (args.height, args.width))
        inputs = write_tiny_shards(Path(tmp) / "in", shards, args.per_shard, pngs)
        output = Path(tmp) / "out"
        started_wall = time.time()
        started = time.perf_counter()
        with PeakMemory() as memory:
            summary = run_compress(CompressConfig(inputs=tuple(inputs), output=str(output), model=args.model,
                                                  batch_size=args.per_shard, metrics=False, cluster=cluster))
        wall = time.perf_counter() - started
        if not summary.complete or summary.errors:
            raise RuntimeError(f"scale job did not complete cleanly:\n{summary.text()}")
        markers = sorted((output / "g0000" / "_commits").glob("*.json"), key=lambda p: p.stat().st_mtime)
        commits = [p.stat().st_mtime - started_wall for p in markers]
        worker_seconds = [json.loads(p.read_text())["seconds"] for p in markers]
    actors = _actors(cluster)
    interval = (commits[-1] - commits[0]) / max(len(commits) - 1, 1)
    steady = worker_seconds[actors:] or worker_seconds  # each actor's first shard carries its warm-up
    return {
        "shards": shards, "images_per_shard": args.per_shard, "actors": actors, "wall_seconds": wall,
        "first_commit_seconds": commits[0], "shards_per_second": 1.0 / interval if interval > 0 else None,
        "worker_seconds_per_shard": sum(steady) / len(steady),
        "overhead_seconds_per_shard": interval * actors - sum(steady) / len(steady),
        "tail_seconds": wall - commits[-1],
        "driver_peak_rss_mb": memory.peak / 2**20, "driver_rss_growth_mb": (memory.peak - memory.start) / 2**20,
    }


def _actors(cluster) -> int:
    """Actors the job ran: one in-process, else the default plan on the embedded Ray (plan_workers)."""
    from ncpipe.pipeline.distributor import plan_workers, runs_in_process

    return 1 if runs_in_process(cluster, "auto") else plan_workers(cluster, "auto")[0]


def print_table(results: list[dict]) -> None:
    print(f"{'shards':>7s} {'first commit s':>15s} {'shards/s':>9s} {'worker s/shard':>15s} "
          f"{'overhead s/shard':>17s} {'tail s':>7s} {'driver peak MB':>15s} {'growth MB':>10s}")
    for r in results:
        print(f"{r['shards']:7d} {r['first_commit_seconds']:15.2f} {r['shards_per_second'] or 0:9.2f} "
              f"{r['worker_seconds_per_shard']:15.3f} {r['overhead_seconds_per_shard']:17.3f} "
              f"{r['tail_seconds']:7.2f} {r['driver_peak_rss_mb']:15.0f} {r['driver_rss_growth_mb']:10.0f}")
    if len(results) > 1:
        small, large = results[0], results[-1]

        def ratio(key: str) -> str:
            return f"{large[key] / small[key]:.2f}" if small[key] else "n/a"

        print(f"{large['shards']} vs {small['shards']} shards (1.00 = flat; target <= 1.20): "
              f"seconds per shard {small['shards_per_second'] / large['shards_per_second']:.2f}, "
              f"driver peak memory {ratio('driver_peak_rss_mb')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--shards", default="200,2000", help="comma-separated job sizes")
    parser.add_argument("--per-shard", type=int, default=3, help="images per shard")
    parser.add_argument("--height", type=int, default=32)
    parser.add_argument("--width", type=int, default=48)
    parser.add_argument("--executor", default="auto", help="where the job's worker runs (default: auto)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # run one size here, print its JSON
    parser.add_argument("--out", type=Path, default=Path("out/bench/scale.json"))
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_size(args, args.one)))
        return
    import torch

    from benchmarks.common import machine, now

    results = []
    for size in (int(s) for s in args.shards.split(",")):
        command = [sys.executable, "-m", "benchmarks.scale", "--images", str(args.images), "--model", args.model,
                   "--per-shard", str(args.per_shard), "--height", str(args.height), "--width", str(args.width),
                   "--executor", args.executor, "--one", str(size)]
        done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"{machine(torch.device('cpu'))} | {now()} | {args.per_shard} images of {args.width}x{args.height} per shard"
          f" | executor {args.executor}")
    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(torch.device("cpu")), "date": now(),
                                    "executor": args.executor, "sizes": results}, indent=2))


if __name__ == "__main__":
    main()
