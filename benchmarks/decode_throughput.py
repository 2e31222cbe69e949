"""Decode throughput of ncpipe against baselines measured in the same run, on the same images.

    python -m benchmarks.decode_throughput --images ../shared/data/kodak --model mbt2018-mean-small-l0018

(a) model ceiling: exact h_s and g_s at batch B on the device (latents already decoded); measured
    after the jobs, under the allocator setting an ncpipe worker makes.
(b) the ncpipe decompress job: bitstream shards in, PNG shards out, with the default executor (one
    local worker: in this process); steady state (sum of per-shard worker seconds) and wall time
    including start-up; then the same on Ray actors (``--executor ray``, Ray started for it).
(c) CompressAI's own per-image ``model.decompress()`` loop with the same model object (so with the
    channels-last g_s weights ncpipe uses on a CPU), before any ncpipe worker ran in this
    process; measured again after the jobs, under the allocator setting an ncpipe worker makes.
(d) classical decoders (imagecodecs), one image per CPU core at a time.
(e) with ``--refiner``: NC-Diffusion refinement images/s for each number of steps.

Ends with the CPU target (docs/performance.md) as measured in this run: the restore job against CompressAI's loop.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from benchmarks.common import by_shape, classical_codecs, load_images, machine, now, print_targets, write_shards
from benchmarks.throughput import CLASSICAL_QUALITY
from ncpipe.codec import LearnedCodec, stack_padded
from ncpipe.config import ClusterConfig, CompressConfig, DecompressConfig
from ncpipe.device import resolve_device, synchronize
from ncpipe.models.registry import load_model
from ncpipe.pipeline.jobs import run_compress, run_decompress


@torch.inference_mode()
def decode_ceiling(codec: LearnedCodec, images, batch: int, repeat: int) -> float:
    """Images/s of exact h_s + g_s on the device, from latents already decoded."""
    prepared = []
    for group in by_shape(images, batch):
        analysed = codec.analyse(group)
        prepared.append((torch.from_numpy(analysed.z_symbols), torch.from_numpy(analysed.y_symbols).to(codec.device)))

    def run() -> None:
        for z, y in prepared:
            _, means = codec.entropy_parameters(z)
            codec.model.adapter.synthesis((y.double() + means).float())
        synchronize(codec.device)

    run()
    started = time.perf_counter()
    for _ in range(repeat):
        run()
    return repeat * len(images) / (time.perf_counter() - started)


@torch.inference_mode()
def compressai_decode_loop(codec: LearnedCodec, images, repeat: int) -> float:
    model = codec.model.adapter.model
    encoded = [model.compress(stack_padded([im], pin=False).to(codec.device).float().div(255.0)) for im in images]
    model.decompress(encoded[0]["strings"], encoded[0]["shape"])
    started = time.perf_counter()
    for _ in range(repeat):
        for out in encoded:
            model.decompress(out["strings"], out["shape"])
    synchronize(codec.device)
    return repeat * len(images) / (time.perf_counter() - started)


def classical_decode(images, names, threads: int) -> dict[str, float]:
    rates = {}
    with ThreadPoolExecutor(threads) as pool:
        for name, codec in classical_codecs(names).items():
            data = [codec.encode(im, CLASSICAL_QUALITY[name]) for im in images]
            list(pool.map(codec.decode, data[:threads]))
            started = time.perf_counter()
            list(pool.map(codec.decode, data))
            rates[name] = len(images) / (time.perf_counter() - started)
    return rates


def decompress_job(archive: Path, output: Path, batch: int, device: str, refiner: str | None = None,
                   steps: int | None = None, executor: str = "auto") -> dict:
    started = time.perf_counter()
    summary = run_decompress(DecompressConfig(inputs=(str(archive),), output=str(output), batch_size=batch,
                                              device=device, overwrite=True,
                                              cluster=ClusterConfig(executor=executor),
                                              **({"refiner": refiner, "refine_steps": steps} if refiner else {})))
    wall = time.perf_counter() - started
    if not summary.complete or summary.errors:
        raise RuntimeError(f"benchmark restore did not complete cleanly:\n{summary.text()}")
    worker_seconds = sum(json.loads(p.read_text())["seconds"] for p in (output / "_commits").glob("*.json"))
    return {"steady_images_per_s": summary.samples / worker_seconds, "wall_images_per_s": summary.samples / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--baselines", nargs="*", default=["jpeg", "webp", "avif", "jpegxl"])
    parser.add_argument("--refiner", help="an NC-Diffusion refiner for --model: also restore with it at each K")
    parser.add_argument("--refiner-steps", type=lambda t: [int(v) for v in t.split(",")], default=[1, 2, 4, 8])
    parser.add_argument("--out", type=Path, default=Path("out/bench/decode_throughput.json"))
    args = parser.parse_args()

    device = resolve_device(args.device)
    paths, images = load_images(args.images, args.count)
    codec = LearnedCodec(load_model(args.model).to(device), coder_threads=os.cpu_count())
    results = {
        "machine": machine(device), "device": str(device), "images": len(images), "batch": args.batch,
        "model": args.model, "date": now(),
        "compressai_loop_images_per_s": compressai_decode_loop(codec, images, args.repeat),
        "classical_images_per_s": classical_decode(images, args.baselines, os.cpu_count() or 1),
    }
    with tempfile.TemporaryDirectory() as tmp:
        shards = write_shards(paths, Path(tmp) / "in", args.shards)
        run_compress(CompressConfig(inputs=tuple(shards), output=f"{tmp}/archive", model=args.model,
                                    device=args.device, metrics=False))
        results["ncpipe_decompress"] = decompress_job(Path(tmp) / "archive", Path(tmp) / "restored",
                                                      args.batch, args.device)
        results["ncpipe_decompress_ray"] = decompress_job(Path(tmp) / "archive", Path(tmp) / "restored-ray",
                                                          args.batch, args.device, executor="ray")
        results["ncpipe_decompress_refined"] = {
            str(k): decompress_job(Path(tmp) / "archive", Path(tmp) / f"refined-{k}", args.batch, args.device,
                                   args.refiner, k)
            for k in (args.refiner_steps if args.refiner else [])
        }
    # The ncpipe worker ran in this process: the ceiling (what ncpipe's transforms reach in a worker's
    # conditions), and the loop again with the allocator as the worker left it.
    results["ceiling_images_per_s"] = decode_ceiling(codec, images, args.batch, args.repeat)
    results["compressai_loop_retained_memory_images_per_s"] = compressai_decode_loop(codec, images, args.repeat)
    codec.close()
    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


def print_table(r: dict) -> None:
    job = r["ncpipe_decompress"]["steady_images_per_s"]
    rows = [
        ("(a) model ceiling: exact h_s + g_s", r["ceiling_images_per_s"], job / r["ceiling_images_per_s"]),
        ("(b) ncpipe decompress job", job, 1.0),
        ("(c) CompressAI decompress() loop", r["compressai_loop_images_per_s"],
         job / r["compressai_loop_images_per_s"]),
    ] + [(f"(d) {name} decode", rate, job / rate) for name, rate in r["classical_images_per_s"].items()] + [
        (f"(e) decompress + NC-Diffusion K={k}", v["steady_images_per_s"], job / v["steady_images_per_s"])
        for k, v in r["ncpipe_decompress_refined"].items()
    ]
    print(f"{r['machine']} | device {r['device']} | {r['images']} images | batch {r['batch']} | {r['date']}")
    print(f"{'measurement':36s} {'images/s':>10s} {'ncpipe / this':>14s}")
    for name, rate, ratio in rows:
        print(f"{name:36s} {rate:10.2f} {ratio:14.2f}")
    ray_job = r["ncpipe_decompress_ray"]
    retained = r["compressai_loop_retained_memory_images_per_s"]
    print(f"ncpipe decompress wall incl. the worker's start-up: {r['ncpipe_decompress']['wall_images_per_s']:.2f} "
          f"images/s; on Ray actors (--executor ray, Ray started): {ray_job['wall_images_per_s']:.2f} "
          f"(steady {ray_job['steady_images_per_s']:.2f})")
    print(f"(c) again, with ncpipe's allocator setting: {retained:.2f} images/s "
          f"(job steady / this: {job / retained:.2f})")
    print_targets([("restore job, steady / CompressAI decompress() loop", job / r["compressai_loop_images_per_s"],
                    ">=", 1.0)])


if __name__ == "__main__":
    main()
