"""What storing the transforms in float16 costs: the same trained weights released both ways.

    python -m benchmarks.half_precision runs/train-codec --images ../shared/data/kodak

A released checkpoint (format ncpipe-codec/2) keeps g_a, h_a and g_s in float16 and everything
that sets entropy parameters (h_s, the entropy models, the quality steps) in float32. This
releases one training state twice, float16 and float32 transforms, codes every image at every
quality level with both (real bitstreams, decoded from their bytes) and prints, per quality, the
mean bpp and PSNR of each and their differences, plus the two checkpoint sizes. Writes JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
from pathlib import Path

import torch

from benchmarks.common import machine, now
from ncpipe.codec import LearnedCodec
from ncpipe.evaluation.learned import evaluate_learned, load_image_set
from ncpipe.io.image_files import list_image_files
from ncpipe.models.checkpoint import CodecModel, model_digest, release_checkpoint
from ncpipe.train.codec_trainer import adapter_from_state
from ncpipe.train.loop import load_state


def released(state: dict, half: bool) -> tuple[CodecModel, int]:
    """The state released with float16 or float32 transforms, and the checkpoint's size in bytes."""
    checkpoint = release_checkpoint(adapter_from_state(state), state["lambdas"], {}, half_precision=half)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return CodecModel(checkpoint, model_digest(checkpoint)), len(buffer.getvalue())


def measure(model: CodecModel, images: list) -> dict[int, dict[str, float]]:
    codec = LearnedCodec(model)
    qualities = range(1, len(model.quality.lambdas) + 1) if model.quality is not None else [0]
    try:
        results = {q: evaluate_learned(codec, "x", images, quality=q) for q in qualities}
    finally:
        codec.close()
    return {q: {"bpp": statistics.fmean(r.bpp for r in rs), "psnr": statistics.fmean(r.psnr for r in rs)}
            for q, rs in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a `ncpipe train codec` run_dir")
    parser.add_argument("--images", type=Path, required=True, help="folder of evaluation images")
    parser.add_argument("--max-images", type=int, help="the first N images only")
    parser.add_argument("--output", type=Path, default=Path("out/bench/half_precision.json"))
    args = parser.parse_args()
    state = load_state(args.run_dir)
    if state is None:
        parser.error(f"{args.run_dir} holds no training state")
    files = list_image_files([str(args.images)])[: args.max_images]
    images = load_image_set(files)
    (half, half_bytes), (full, full_bytes) = released(state, True), released(state, False)
    rows, half_results, full_results = [], measure(half, images), measure(full, images)
    print(f"{len(images)} images of {args.images}; checkpoint {half_bytes / 2**20:.1f} MiB (float16 transforms) "
          f"vs {full_bytes / 2**20:.1f} MiB (float32)")
    print(f"{'quality':>7s} {'bpp f32':>8s} {'bpp f16':>8s} {'Δbpp %':>7s} {'PSNR f32':>9s} {'PSNR f16':>9s} "
          f"{'ΔPSNR':>7s}")
    for quality in half_results:
        h, f = half_results[quality], full_results[quality]
        row = {"quality": quality, "float32": f, "float16": h, "bpp_change_percent": 100 * (h["bpp"] / f["bpp"] - 1),
               "psnr_change_db": h["psnr"] - f["psnr"]}
        rows.append(row)
        print(f"{quality:7d} {f['bpp']:8.4f} {h['bpp']:8.4f} {row['bpp_change_percent']:+7.3f} {f['psnr']:9.3f} "
              f"{h['psnr']:9.3f} {row['psnr_change_db']:+7.4f}")
    worst = min(r["psnr_change_db"] for r in rows)
    print(f"worst PSNR change: {worst:+.4f} dB; {now()} on {machine(torch.device('cpu'))}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "date": now(), "machine": machine(torch.device("cpu")), "images": str(args.images), "count": len(images),
        "checkpoint_bytes": {"float16": half_bytes, "float32": full_bytes}, "rows": rows,
        "worst_psnr_change_db": worst}, indent=2))


if __name__ == "__main__":
    main()
