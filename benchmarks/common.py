"""Helpers shared by the benchmarks: images, shards, timing."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ncpipe.codec import padded_shape
from ncpipe.images import decode_image


def load_images(directory: Path, count: int) -> tuple[list[Path], list[np.ndarray]]:
    paths = sorted(directory.glob("*.png"))[:count]
    return paths, [decode_image(p.read_bytes(), "png").pixels for p in paths]


def by_shape(images: list[np.ndarray], batch: int) -> list[list[np.ndarray]]:
    groups: dict[tuple[int, int], list[np.ndarray]] = {}
    for image in images:
        groups.setdefault(padded_shape(*image.shape[:2]), []).append(image)
    return [group[i : i + batch] for group in groups.values() for i in range(0, len(group), batch)]


def write_shards(paths: list[Path], directory: Path, shards: int) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    per_shard = -(-len(paths) // shards)
    urls = []
    for s in range(shards):
        url = directory / f"bench-{s:06d}.tar"
        with tarfile.open(url, "w") as tar:
            for path in paths[s * per_shard : (s + 1) * per_shard]:
                tar.add(path, arcname=path.name)
        urls.append(str(url))
    return urls


def classical_codecs(names) -> dict:
    """The classical baselines by name, or none where their library (imagecodecs) is not installed
    (a GPU machine that carries only what the codec needs): the rows are then left out, with a warning."""
    try:
        from ncpipe.evaluation.baselines import get_baselines
    except ImportError as err:
        print(f"classical baselines not measured: {err}")
        return {}
    return get_baselines(names)


def machine(device: torch.device) -> str:
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "no GPU used"
    return f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, {gpu}"


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def demo_wall_seconds(device: str = "auto") -> float:
    """Wall seconds of ``ncpipe demo`` (compress and restore of the shipped samples) in a fresh process,
    as a user runs it once set up: Python start, imports, model loading included."""
    with tempfile.TemporaryDirectory() as tmp:
        return command_wall_seconds("demo", "-o", tmp, "--device", device)


def command_wall_seconds(*arguments: str) -> float:
    """Wall seconds of ``ncpipe ARGUMENTS`` in a fresh process (its output discarded)."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ncpipe", *arguments], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def print_targets(targets: list[tuple[str, float | None, str, float]]) -> None:
    """The CPU targets (docs/performance.md) as measured in this run: (what, value, ">=" or "<=", target)."""
    print("targets (this run):")
    for name, value, op, target in targets:
        if value is None:
            print(f"  {name:58s} {'-':>8s}  {op} {target:<5g} not measured")
            continue
        met = value >= target if op == ">=" else value <= target
        print(f"  {name:58s} {value:8.2f}  {op} {target:<5g} {'met' if met else 'NOT met'}")
