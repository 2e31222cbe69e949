"""Encode throughput of ncpipe against baselines measured in the same run, on the same images.

    python -m benchmarks.throughput --images ../shared/data/kodak --model mbt2018-mean-small-l0018

(a) model ceiling: g_a, h_a and h_s (the entropy-parameter prediction) at batch B on the
    device, nothing else; with ``+g_s`` also the synthesis ncpipe runs for its metrics. Measured
    after the jobs, under the allocator setting an ncpipe worker makes.
(b) the ncpipe compress job: PNG shards in, bitstream shards and manifests out, with the default
    executor (one local worker: in this process); steady state (sum of per-shard worker seconds)
    and wall time including the worker's start-up, with and without per-image metrics; then the
    same job as ``ncpipe compress`` in a fresh process (Python start and imports included), and on
    Ray actors (``--executor ray``: an embedded Ray started for it).
(c) CompressAI's own per-image ``model.compress()`` loop with the same model object on the device
    (so with the channels-last weights ncpipe gives g_a and g_s on a CPU);
    (c') the same loop plus its own g_s per image (what per-image metrics need). Both run before
    any ncpipe worker, in a process as CompressAI leaves it; the loop is measured again after the
    jobs, under the allocator setting an ncpipe worker makes (``ncpipe.allocator``), for comparison.
(d) classical encoders (imagecodecs) at a mid quality, one image per CPU core at a time.
(e) ``ncpipe demo``'s wall time (compress + restore of the shipped samples, fresh process), run first.

Prints a table with the ratios (b)/(a), (b)/(c), (b)/(d), then the CPU targets (docs/performance.md) as measured in this
run (ratios against the CompressAI loop, the demo's seconds), and writes it all as JSON.
Runs small on a CPU machine and full on a GPU machine (``--device cuda``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import torch

from benchmarks.common import (
    by_shape,
    classical_codecs,
    command_wall_seconds,
    demo_wall_seconds,
    load_images,
    machine,
    now,
    print_targets,
    write_shards,
)
from ncpipe.codec import stack_padded
from ncpipe.config import ClusterConfig, CompressConfig
from ncpipe.device import resolve_device, synchronize
from ncpipe.models.registry import load_model
from ncpipe.pipeline.jobs import run_compress

CLASSICAL_QUALITY = {"jpeg": 50, "webp": 50, "avif": 40, "jpegxl": 50}


@torch.inference_mode()
def model_ceiling(model, images, batch: int, device: torch.device, with_synthesis: bool, repeat: int) -> float:
    """Images/s of the transforms alone (inputs already on the device, as uint8)."""
    adapter = model.adapter
    batches = [stack_padded(group, pin=False).to(device) for group in by_shape(images, batch)]

    def run() -> None:
        for x in batches:
            y, z = adapter.analysis(x.float().div(255.0))
            z_hat = torch.round(z - model.z_medians.view(1, -1, 1, 1)) + model.z_medians.view(1, -1, 1, 1)
            scales, means = adapter.split_entropy_parameters(adapter.model.h_s(z_hat))
            if with_synthesis:
                adapter.synthesis(torch.round(y - means) + means)
        synchronize(device)

    run()  # warm-up
    started = time.perf_counter()
    for _ in range(repeat):
        run()
    return repeat * len(images) / (time.perf_counter() - started)


@torch.inference_mode()
def compressai_loop(model, images, device: torch.device, repeat: int, with_synthesis: bool = False) -> float:
    """Images/s of CompressAI's per-image compress() (its own entropy coder and Python loop); with
    ``with_synthesis`` each image's g_s too, on its ŷ (computed before the clock starts)."""
    compression_model = model.adapter.model
    tensors = [stack_padded([image], pin=False).to(device).float().div(255.0) for image in images]
    y_hats = [torch.round(compression_model.g_a(x)) for x in tensors] if with_synthesis else [None] * len(tensors)

    def one(x, y_hat) -> None:
        compression_model.compress(x)
        if y_hat is not None:
            compression_model.g_s(y_hat)

    one(tensors[0], y_hats[0])
    started = time.perf_counter()
    for _ in range(repeat):
        for x, y_hat in zip(tensors, y_hats):
            one(x, y_hat)
    synchronize(device)
    return repeat * len(images) / (time.perf_counter() - started)


def classical(images, names, threads: int) -> dict[str, float]:
    """Images/s of each classical encoder, ``threads`` images encoded at a time."""
    rates = {}
    with ThreadPoolExecutor(threads) as pool:
        for name, codec in classical_codecs(names).items():
            encode = partial(codec.encode, quality=CLASSICAL_QUALITY[name])
            list(pool.map(encode, images[:threads]))  # warm-up
            started = time.perf_counter()
            list(pool.map(encode, images))
            rates[name] = len(images) / (time.perf_counter() - started)
    return rates


def ncpipe_job(shards: list[str], model: str, output: Path, batch: int, device: str, metrics: bool,
               coder_threads: int | None = None, executor: str = "auto") -> dict:
    """Runs the compress job; returns steady-state and wall images/s."""
    started = time.perf_counter()
    summary = run_compress(CompressConfig(
        inputs=tuple(shards), output=str(output), model=model, batch_size=batch, device=device,
        metrics=metrics, overwrite=True, coder_threads=coder_threads, cluster=ClusterConfig(executor=executor),
    ))
    wall = time.perf_counter() - started
    markers = [json.loads(p.read_text()) for p in (output / "g0000" / "_commits").glob("*.json")]
    worker_seconds = sum(m["seconds"] for m in markers)
    if not summary.complete or summary.errors:
        raise RuntimeError(f"benchmark job did not complete cleanly:\n{summary.text()}")
    return {
        "steady_images_per_s": summary.samples / worker_seconds,
        "wall_images_per_s": summary.samples / wall,
        "megapixels_per_s": summary.samples / worker_seconds * _mean_megapixels(output),
        "mean_bpp": summary.mean_bpp,
    }


def command_images_per_s(shards: list[str], count: int, model: str, output: Path, batch: int, device: str) -> float:
    """Images/s of ``ncpipe compress --no-metrics`` in a fresh process, counting all of its wall time."""
    seconds = command_wall_seconds("compress", *shards, "-o", str(output), "--model", model, "--batch-size",
                                   str(batch), "--device", device, "--no-metrics", "--overwrite")
    return count / seconds


def _mean_megapixels(output: Path) -> float:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(output / "g0000" / "manifest")
    return float(pc.mean(pc.multiply(table["width"], table["height"])).as_py()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--coder-threads", type=int, help="entropy-coding threads of the job's actor "
                        "(default: its CPUs)")
    parser.add_argument("--baselines", nargs="*", default=["jpeg", "webp", "avif", "jpegxl"])
    parser.add_argument("--no-demo", action="store_true", help="leave out the demo's wall time")
    parser.add_argument("--out", type=Path, default=Path("out/bench/throughput.json"))
    args = parser.parse_args()

    # first, in a fresh process, before this one starts Ray or loads a model
    demo_seconds = None if args.no_demo else demo_wall_seconds(args.device)
    device = resolve_device(args.device)
    threads = os.cpu_count() or 1
    paths, images = load_images(args.images, args.count)
    model = load_model(args.model).to(device)
    results = {
        "machine": machine(device),
        "device": str(device), "images": len(images), "batch": args.batch, "model": args.model,
        "date": now(),
        "compressai_loop_images_per_s": compressai_loop(model, images, device, args.repeat),
        "compressai_loop_with_synthesis_images_per_s": compressai_loop(model, images, device, args.repeat, True),
        "demo_wall_seconds": demo_seconds,
        "classical_images_per_s": classical(images, args.baselines, threads),
    }
    with tempfile.TemporaryDirectory() as tmp:
        shards = write_shards(paths, Path(tmp) / "in", args.shards)
        results["ncpipe_command_images_per_s"] = command_images_per_s(
            shards, len(images), args.model, Path(tmp) / "command", args.batch, args.device)
        for key, metrics, executor in (("ncpipe_no_metrics", False, "auto"), ("ncpipe_with_metrics", True, "auto"),
                                       ("ncpipe_no_metrics_ray", False, "ray")):
            results[key] = ncpipe_job(shards, args.model, Path(tmp) / key, args.batch, args.device, metrics,
                                      args.coder_threads, executor)
    # The ncpipe worker ran in this process: the ceilings (what ncpipe's transforms reach in a worker's
    # conditions), and the loop again with the allocator as the worker left it.
    results["ceiling_images_per_s"] = model_ceiling(model, images, args.batch, device, False, args.repeat)
    results["ceiling_with_synthesis_images_per_s"] = model_ceiling(model, images, args.batch, device, True,
                                                                   args.repeat)
    results["compressai_loop_retained_memory_images_per_s"] = compressai_loop(model, images, device, args.repeat)
    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


def print_table(r: dict) -> None:
    job = r["ncpipe_no_metrics"]["steady_images_per_s"]
    job_metrics = r["ncpipe_with_metrics"]["steady_images_per_s"]
    rows = [
        ("(a) model ceiling: g_a+h_a+h_s", r["ceiling_images_per_s"], job / r["ceiling_images_per_s"]),
        ("(a') ceiling incl. g_s", r["ceiling_with_synthesis_images_per_s"],
         job_metrics / r["ceiling_with_synthesis_images_per_s"]),
        ("(b) ncpipe job, no metrics", job, 1.0),
        ("(b') ncpipe job, with metrics", job_metrics, 1.0),
        ("(c) CompressAI compress() loop", r["compressai_loop_images_per_s"], job / r["compressai_loop_images_per_s"]),
    ] + [(f"(d) {name}", rate, job / rate) for name, rate in r["classical_images_per_s"].items()]
    print(f"{r['machine']} | device {r['device']} | {r['images']} images | batch {r['batch']} | {r['date']}")
    print(f"{'measurement':36s} {'images/s':>10s} {'ncpipe / this':>14s}")
    for name, rate, ratio in rows:
        print(f"{name:36s} {rate:10.2f} {ratio:14.2f}")
    print(f"ncpipe job wall incl. the worker's start-up: {r['ncpipe_no_metrics']['wall_images_per_s']:.2f} images/s; "
          f"as `ncpipe compress` in a fresh process: {r['ncpipe_command_images_per_s']:.2f}; on Ray actors "
          f"(--executor ray, Ray started): {r['ncpipe_no_metrics_ray']['wall_images_per_s']:.2f} "
          f"(steady {r['ncpipe_no_metrics_ray']['steady_images_per_s']:.2f}); (a') row compares (b') with (a').")
    loop, loop_synthesis = r["compressai_loop_images_per_s"], r["compressai_loop_with_synthesis_images_per_s"]
    print(f"(c') CompressAI compress() loop + g_s: {loop_synthesis:.2f} images/s")
    retained = r["compressai_loop_retained_memory_images_per_s"]
    print(f"(c) again, with ncpipe's allocator setting: {retained:.2f} images/s "
          f"(job steady / this: {job / retained:.2f})")
    print_targets([
        ("encode job, no metrics, steady / CompressAI loop", job / loop, ">=", 1.0),
        ("encode job, no metrics, wall / CompressAI loop", r["ncpipe_no_metrics"]["wall_images_per_s"] / loop,
         ">=", 0.7),
        ("same, `ncpipe compress` in a fresh process / CompressAI loop", r["ncpipe_command_images_per_s"] / loop,
         ">=", 0.7),
        ("encode job, with metrics, steady / (CompressAI loop + g_s)", job_metrics / loop_synthesis, ">=", 0.8),
        ("ncpipe demo, compress + restore, wall seconds", r["demo_wall_seconds"], "<=", 15.0),
    ])


if __name__ == "__main__":
    main()
