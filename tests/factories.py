"""Builders for real test inputs: tiny trained models and images from the shared data."""

from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
# The shared data beside the checkout; NCPIPE_TEST_DATA points elsewhere (a GPU machine carries a copy).
SHARED_DATA = Path(os.environ.get("NCPIPE_TEST_DATA") or REPO_ROOT.parent / "shared" / "data")
KODAK = SHARED_DATA / "kodak"
BSDS = SHARED_DATA / "bsds500"

TINY_HPARAMS = {"N": 16, "M": 24}


def kodak_pixels(number: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """Kodak image ``number`` as HxWx3 uint8, optionally cropped to (height, width)."""
    image = np.asarray(Image.open(KODAK / f"kodim{number:02d}.png").convert("RGB"))
    if size:
        image = image[: size[0], : size[1]]
    return np.ascontiguousarray(image)


def train_tiny_codec(workdir: Path, steps: int = 40, lambdas: tuple[float, ...] = (0.01,)) -> Path:
    """Train a tiny mbt2018-mean for a few steps with ncpipe's trainer and release it
    (variable-rate, with quality levels 1..n, when given n > 1 λ)."""
    from ncpipe.models.checkpoint import release_checkpoint, save_checkpoint
    from ncpipe.train.codec_trainer import CodecTrainConfig, adapter_from_state, train_codec
    from ncpipe.train.loop import load_state

    data = workdir / "train-images"
    data.mkdir(parents=True, exist_ok=True)
    for path in sorted((BSDS / "val").glob("*.jpg"))[:6]:
        shutil.copy(path, data / path.name)
    config = CodecTrainConfig(
        data=(str(data),), run_dir=str(workdir / "run"), hparams=dict(TINY_HPARAMS), lambdas=lambdas,
        steps=steps, batch_size=4, crop=64, lr=1e-3, checkpoint_every=steps, log_every=steps, device="cpu",
    )
    train_codec(config)
    adapter = adapter_from_state(load_state(Path(config.run_dir)))
    path = workdir / "tiny" / "model.pt"
    save_checkpoint(release_checkpoint(adapter, lambdas, {"purpose": "tests", "steps": steps}), path)
    return path


def encoded(pixels: np.ndarray, fmt: str = "PNG", mode: str = "RGB") -> bytes:
    """Pixels (HxWx3 uint8) encoded as an image file in ``fmt`` after converting to ``mode``."""
    buffer = io.BytesIO()
    image = Image.fromarray(pixels, "RGB")
    image = image.quantize(64) if mode == "P" else image.convert(mode)
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` (a decompression-bomb stand-in)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
