"""Rate-distortion of a learned codec on an image set, from real bitstreams.

Each image is encoded alone and decoded from its bytes by a fresh decode (parse, rANS,
exact entropy parameters, synthesis), so the bpp counts the whole container and the
quality is what a user restores. The decoded latents are checked against the encoder's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ncpipe import metrics
from ncpipe.codec import LearnedCodec, to_uint8_image
from ncpipe.images import decode_image


@dataclass(frozen=True)
class ImageResult:
    codec: str
    rate: str  # the rate point: λ for learned codecs, quality for classical ones
    image: str
    width: int
    height: int
    num_bytes: int
    bpp: float
    psnr: float
    ms_ssim: float
    encode_seconds: float
    decode_seconds: float


def load_image_set(paths: list[Path]) -> list[tuple[str, np.ndarray]]:
    return [(path.name, decode_image(path.read_bytes(), path.suffix.lstrip(".")).pixels) for path in paths]


def quality(reference: np.ndarray, decoded: np.ndarray) -> tuple[float, float]:
    """(PSNR, MS-SSIM) of two HxWx3 uint8 images."""
    ref = metrics.to_unit_float(reference)
    dec = metrics.to_unit_float(decoded)
    return float(metrics.psnr(ref, dec)[0]), float(metrics.ms_ssim(ref, dec)[0])


def evaluate_learned(codec: LearnedCodec, name: str, images: list[tuple[str, np.ndarray]]) -> list[ImageResult]:
    results = []
    for image_name, pixels in images:
        started = time.perf_counter()
        batch = codec.analyse([pixels])
        data = codec.submit_entropy_coding(batch, 0, "RGB").result()
        _sync(codec.device)
        encoded = time.perf_counter()
        header, symbols = codec.decode_symbols(data)
        (x_hat,) = codec.synthesise([header], [symbols])
        decoded = to_uint8_image(x_hat)
        finished = time.perf_counter()
        if not np.array_equal(symbols.y, batch.y_symbols[0]):
            raise AssertionError(f"{image_name}: decoded latents differ from the encoder's")
        psnr, ms_ssim = quality(pixels, decoded)
        results.append(ImageResult(
            codec=name, rate=f"{codec.model.identity.rate:g}", image=image_name, width=header.width,
            height=header.height, num_bytes=len(data), bpp=8 * len(data) / (header.width * header.height),
            psnr=psnr, ms_ssim=ms_ssim, encode_seconds=encoded - started, decode_seconds=finished - encoded,
        ))
    return results


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
