"""Mutated bitstreams through the real decoder, many of them: refused or decoded, never a crash or a hang.

Originals are real bitstreams of every format version (1: the fixed-rate shipped codec; 2: the
same with a CorrDiff extension; 3: the variable-rate default codec; 4: the same carrying EXIF, ICC
and XMP) of a flat, a detailed and a 1x1 image. Each example applies 1-6 random mutations, then:

- structural (about 3 in 4): header bytes, chunk payload bytes, word counts, truncated, extended,
  dropped and duplicated chunks, extension payloads, kinds, lengths and counts; with every CRC32
  recomputed after mutating, so the damage reaches the rANS decoder, the exact h_s and g_s;
- raw: byte changes and truncation of the whole bitstream, CRCs left as they are.

Each decode must raise ``BitstreamError`` / ``ModelMismatchError`` or give an image of the declared
size; anything else is a crash, more than ``--hang-seconds`` (SIGALRM) a hang. Run:

    python benchmarks/fuzz_decoder.py --examples 10000 --out out/fuzz_decoder.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import signal
import struct
import time
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ncpipe import bitstream as fmt
from ncpipe.codec import LearnedCodec, ModelMismatchError
from ncpipe.images import ImageMetadata
from ncpipe.models.registry import load_model

MAX_PIXELS = 256 * 256  # the decoder's --max-pixels for this run: bounds what one bitstream may allocate
REFUSALS = (fmt.BitstreamError, ModelMismatchError)
STRUCTURAL = ("header byte", "payload byte", "payload byte", "word count", "truncate chunk", "extend chunk",
              "drop chunk", "duplicate chunk", "extension payload", "extension kind", "extension drop",
              "extension add")


@dataclass
class Frame:
    """A bitstream taken apart: fixed header (without its CRC), chunk payloads, extensions."""

    header: bytearray
    chunks: list[bytearray]
    extensions: list[tuple[int, bytearray]] | None  # None: a version-1 bitstream (no extension block)

    @classmethod
    def of(cls, data: bytes) -> "Frame":
        parsed = fmt.parse(data)
        header = bytearray(data[: parsed.header.size - 4])
        chunks = [bytearray(s) for s in (parsed.z_stream, *parsed.y_streams)]
        extensions = None if parsed.header.version == 1 else [(e.kind, bytearray(e.payload))
                                                               for e in parsed.extensions]
        return cls(header, chunks, extensions)

    def pack(self) -> bytes:
        """The bytes, every CRC32 right."""
        parts = [bytes(self.header), struct.pack("<I", zlib.crc32(self.header))]
        for chunk in self.chunks:
            parts += [struct.pack("<I", len(chunk)), bytes(chunk), struct.pack("<I", zlib.crc32(chunk))]
        if self.extensions is not None:
            parts.append(bytes([len(self.extensions) & 0xFF]))
            for kind, payload in self.extensions:
                head = struct.pack("<BI", kind, len(payload))
                parts += [head, bytes(payload), struct.pack("<I", zlib.crc32(head + payload))]
        return b"".join(parts)


def mutate_structure(rng: random.Random, data: bytes) -> bytes:
    frame = Frame.of(data)
    for _ in range(rng.randint(1, 6)):
        kind = rng.choice(STRUCTURAL)
        chunk = rng.choice(frame.chunks) if frame.chunks else None
        if kind == "header byte":
            frame.header[rng.randrange(4, len(frame.header))] = rng.randrange(256)
        elif kind == "payload byte" and chunk:
            chunk[rng.randrange(len(chunk))] = rng.randrange(256)
        elif kind == "word count" and chunk is not None and len(chunk) >= 4:
            value = rng.choice([0, 1, 2, 0xFFFF, 0xFFFFFFFF, rng.randrange(2**32)])
            chunk[:4] = struct.pack("<I", value)
        elif kind == "truncate chunk" and chunk is not None:
            del chunk[rng.randint(0, len(chunk)):]
        elif kind == "extend chunk" and chunk is not None:
            chunk += rng.randbytes(rng.randint(1, 64))
        elif kind == "drop chunk" and frame.chunks:
            frame.chunks.pop(rng.randrange(len(frame.chunks)))
        elif kind == "duplicate chunk" and chunk is not None:
            frame.chunks.insert(rng.randrange(len(frame.chunks) + 1), bytearray(chunk))
        elif frame.extensions:
            mutate_extensions(rng, kind, frame.extensions)
    return frame.pack()


def mutate_extensions(rng: random.Random, kind: str, extensions: list[tuple[int, bytearray]]) -> None:
    index = rng.randrange(len(extensions))
    ext_kind, payload = extensions[index]
    if kind == "extension payload" and payload:
        payload[rng.randrange(len(payload))] = rng.randrange(256)
        if rng.random() < 0.3:
            del payload[rng.randint(0, len(payload)):]
    elif kind == "extension kind":
        extensions[index] = (rng.choice([0, 1, 2, 3, 4, 5, 255]), payload)
    elif kind == "extension drop":
        extensions.pop(index)
    elif kind == "extension add":
        extensions.append((rng.choice([1, 2, 3, 4, 9]), bytearray(rng.randbytes(rng.randint(0, 80)))))


def mutate_raw(rng: random.Random, data: bytes) -> bytes:
    mutated = bytearray(data)
    for _ in range(rng.randint(0, 4)):
        mutated[rng.randrange(len(mutated))] = rng.randrange(256)
    return bytes(mutated[: rng.randint(0, len(mutated))])


class Hang(Exception):
    pass


def _expire(signum, frame):
    raise Hang()


@dataclass
class Tally:
    outcomes: dict[str, int] = field(default_factory=lambda: {"refused": 0, "decoded": 0, "crash": 0, "hang": 0})
    by_kind: dict[str, int] = field(default_factory=lambda: {"structural": 0, "raw": 0})
    slowest_s: float = 0.0
    crashes: list[str] = field(default_factory=list)


def decode_one(codecs: dict[str, LearnedCodec], data: bytes, hang_seconds: int) -> str:
    signal.alarm(hang_seconds)
    try:
        try:
            header = fmt.parse_header(data, MAX_PIXELS)
            codec = codecs.get(header.model_sha256) or next(iter(codecs.values()))
            header, symbols = codec.decode_symbols(data, MAX_PIXELS)
        except REFUSALS:
            return "refused"
        (x_hat,) = codec.synthesise([header], [symbols])
        if tuple(x_hat.shape) != (3, header.height, header.width):
            raise AssertionError(f"decoded {tuple(x_hat.shape)} for a {header.width}x{header.height} header")
        return "decoded"
    finally:
        signal.alarm(0)


def originals(fixed: LearnedCodec, variable: LearnedCodec, images: list[np.ndarray]) -> list[bytes]:
    metadata = fmt.metadata_extensions(ImageMetadata(b"MM\x00*\x00\x00\x00\x08\x00\x00", bytes(range(200)),
                                                     b"<x:xmpmeta/>"))
    coefficients = fmt.CorrectionCoefficients.quantize("ab" * 32, 7, 4, [0.1, 0.5, 0.9]).to_extension()
    found = []
    for image in images:
        v1 = fixed.encode_batch([image], ["RGB"])[0]
        parsed = fmt.parse(v1)
        found += [v1, fmt.pack(fmt.Bitstream(parsed.header, parsed.z_stream, parsed.y_streams, (coefficients,)))]
        analysed = variable.analyse([image])
        found += [variable.submit_entropy_coding(analysed, 0, "RGB").result(),
                  variable.submit_entropy_coding(analysed, 0, "RGB", metadata).result()]
    assert sorted({fmt.parse(b).header.version for b in found}) == [1, 2, 3, 4]
    return found


def kodak(directory: Path, number: int, size: tuple[int, int]) -> np.ndarray:
    pixels = np.asarray(Image.open(directory / f"kodim{number:02d}.png").convert("RGB"))
    return np.ascontiguousarray(pixels[: size[0], : size[1]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kodak", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "kodak"))
    parser.add_argument("--hang-seconds", type=int, default=10)
    parser.add_argument("--out", default="out/fuzz_decoder.json")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    fixed = LearnedCodec(load_model("mbt2018-mean-small-l0018"), y_chunk_channels=32, coder_threads=1)
    variable = LearnedCodec(load_model("mbt2018-mean-vbr-small"), y_chunk_channels=32, coder_threads=1)
    codecs = {c.model.identity.sha256: c for c in (fixed, variable)}
    directory = Path(args.kodak)
    bases = originals(fixed, variable, [kodak(directory, 1, (64, 64)), kodak(directory, 13, (70, 130)),
                                        kodak(directory, 20, (1, 1))])
    rng = random.Random(args.seed)
    tally = Tally()
    signal.signal(signal.SIGALRM, _expire)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    for example in range(args.examples):
        original = rng.choice(bases)
        structural = rng.random() < 0.75
        data = mutate_structure(rng, original) if structural else mutate_raw(rng, original)
        tally.by_kind["structural" if structural else "raw"] += 1
        one = time.perf_counter()
        try:
            outcome = decode_one(codecs, data, args.hang_seconds)
        except Hang:
            outcome = "hang"
        except Exception:  # noqa: BLE001  a crash is what this run looks for
            outcome = "crash"
            tally.crashes.append(f"example {example}: {traceback.format_exc(limit=3)}")
        tally.slowest_s = max(tally.slowest_s, time.perf_counter() - one)
        tally.outcomes[outcome] += 1
        if (example + 1) % 1000 == 0:
            print(f"{example + 1} examples: {tally.outcomes}", flush=True)
    result = {
        "command": f"python benchmarks/fuzz_decoder.py --examples {args.examples} --seed {args.seed}",
        "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs)",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "examples": args.examples, "originals": len(bases), "by_kind": tally.by_kind, "outcomes": tally.outcomes,
        "slowest_example_s": round(tally.slowest_s, 3), "wall_s": round(time.perf_counter() - started, 1),
        "peak_rss_growth_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before, 1),
        "crashes": tally.crashes[:20],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "crashes"}, indent=1))
    if tally.outcomes["crash"] or tally.outcomes["hang"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
