"""Peak memory of decoding one image, per megapixel, with g_s in tiles and in one piece.

A bitstream of all-zero latents of each size is built first (the synthesis runs on every position
whatever the symbols, so any bitstream of that size costs the same); each (size, mode) is then
decoded in a fresh process, which decodes a 64x64 image to warm up, resets its peak RSS (Linux
``/proc/self/clear_refs``) and records how far the peak rises above the RSS it had while
``LearnedCodec.decode`` runs on the big one: the decode's own peak, returned pixels included.

    python benchmarks/decoder_memory.py                       # default model, 1, 4 and 16 MP
    python benchmarks/decoder_memory.py --sizes 1024,2048 --model mbt2018-mean-vbr-small
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ncpipe.codec import AnalysedBatch, LearnedCodec
from ncpipe.config import DEFAULT_MODEL
from ncpipe.models import tiling
from ncpipe.models.registry import load_model


def zero_bitstream(codec: LearnedCodec, side: int) -> bytes:
    """A bitstream of ``side`` x ``side`` pixels whose z and y symbols are all 0."""
    header = codec.header_for(side, side, "RGB")
    z = np.zeros((1, *header.z_shape), np.int32)
    indexes, _ = codec.entropy_parameters(torch.from_numpy(z), [header.quality])
    batch = AnalysedBatch(((side, side),), header.quality, z, np.zeros((1, *header.y_shape), np.int32),
                          indexes.cpu().numpy(), None)
    return codec.submit_entropy_coding(batch, 0, "RGB").result()


def status_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, in MB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    """Start VmHWM again from the current RSS (``clear_refs`` 5), so that earlier peaks (loading the
    model, building the bitstream) do not hide the decode's."""
    Path("/proc/self/clear_refs").write_text("5")


def measure_one(model: str, bitstream: str, tiled: bool) -> dict:
    """In this process: the peak RSS growth of decoding the bitstream in file ``bitstream``."""
    torch.set_num_threads(1)
    if not tiled:  # one tile as large as any image: g_s in one piece, as before tiling
        tiling.LATENT_TILE = 1 << 16
    codec = LearnedCodec(load_model(model), coder_threads=1)
    data = Path(bitstream).read_bytes()
    side = codec.decode_symbols(data)[0].width
    codec.decode(zero_bitstream(codec, 64))
    reset_peak()
    before = status_mb("VmRSS")
    started = time.perf_counter()
    header, pixels = codec.decode(data)
    seconds = time.perf_counter() - started
    assert pixels.shape == (side, side, 3)
    growth = status_mb("VmHWM") - before
    return {"side": side, "megapixels": side * side / 1e6, "tiled": tiled, "peak_growth_mb": round(growth, 1),
            "mb_per_megapixel": round(growth / (side * side / 1e6), 1), "decode_seconds": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--sizes", default="1024,2048,4096", help="image sides in pixels, comma-separated")
    parser.add_argument("--modes", default="untiled,tiled")
    parser.add_argument("--one", nargs=2, metavar=("BITSTREAM", "MODE"), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.model, args.one[0], args.one[1] == "tiled")))
        return
    rows = []
    codec = LearnedCodec(load_model(args.model), coder_threads=1)
    workdir = Path(tempfile.mkdtemp(prefix="decoder-memory-"))
    for side in (int(s) for s in args.sizes.split(",")):
        bitstream = workdir / f"zero-{side}.ncb"
        bitstream.write_bytes(zero_bitstream(codec, side))
        for mode in args.modes.split(","):
            child = subprocess.run([sys.executable, __file__, "--model", args.model, "--one", str(bitstream), mode],
                                   capture_output=True, text=True, check=True)
            rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
            print(f"{side}x{side} {mode:8s} peak +{rows[-1]['peak_growth_mb']:8.1f} MB "
                  f"({rows[-1]['mb_per_megapixel']:6.1f} MB/MP), {rows[-1]['decode_seconds']:.1f} s", flush=True)
    machine = f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs)"
    print(json.dumps({"model": args.model, "machine": machine,
                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
