"""Rate-distortion of a learned codec on an image set, from real bitstreams.

Each image is encoded alone and decoded from its bytes by a fresh decode (parse, rANS,
exact entropy parameters, synthesis), so the bpp counts the whole container and the
quality is what a user restores. The decoded latents are checked against the encoder's.
A variable-rate model is measured at each of its quality levels: one rate point per level.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ncpipe import metrics
from ncpipe.codec import LearnedCodec, to_uint8_image
from ncpipe.device import synchronize
from ncpipe.images import decode_image
from ncpipe.models.cards import anchor_gap, machine_description, now_utc
from ncpipe.models.checkpoint import CodecModel
from ncpipe.progress import Progress


@dataclass(frozen=True)
class ImageResult:
    codec: str
    rate: str  # λ of the quality level coded at, as f"{λ:g}"
    quality: int  # the learned model's quality level (0: a fixed-rate model)
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


def image_quality(reference: np.ndarray, decoded: np.ndarray) -> tuple[float, float]:
    """(PSNR, MS-SSIM) of two HxWx3 uint8 images."""
    ref = metrics.to_unit_float(reference)
    dec = metrics.to_unit_float(decoded)
    return float(metrics.psnr(ref, dec)[0]), float(metrics.ms_ssim(ref, dec)[0])


def rate_points(model: CodecModel) -> tuple[int, ...]:
    """The quality levels a model is measured at: each level of a variable-rate model, 0 for a fixed-rate one."""
    return tuple(range(1, len(model.quality.lambdas) + 1)) if model.quality is not None else (0,)


def evaluate_model(codec: LearnedCodec, name: str, images: list[tuple[str, np.ndarray]],
                   progress: Progress | None = None) -> list[ImageResult]:
    """:func:`evaluate_learned` at each of :func:`rate_points`, lowest quality first."""
    return [result for quality in rate_points(codec.model)
            for result in evaluate_learned(codec, name, images, quality, progress)]


def evaluate_learned(codec: LearnedCodec, name: str, images: list[tuple[str, np.ndarray]],
                     quality: int | None = None, progress: Progress | None = None) -> list[ImageResult]:
    """Each image coded at ``quality`` (default: the model's default quality); ``progress`` advances per image."""
    quality = codec.default_quality if quality is None else quality
    codec.model.check_quality(quality)
    label = f"{name} q{quality}" if quality else name
    results = []
    for image_name, pixels in images:
        results.append(_measure(codec, name, quality, image_name, pixels))
        if progress is not None:
            progress.advance(label)
    return results


def _measure(codec: LearnedCodec, name: str, quality: int, image_name: str, pixels: np.ndarray) -> ImageResult:
    started = time.perf_counter()
    batch = codec.analyse([pixels], quality=quality)
    data = codec.submit_entropy_coding(batch, 0, "RGB").result()
    synchronize(codec.device)
    encoded = time.perf_counter()
    header, symbols = codec.decode_symbols(data)
    (x_hat,) = codec.synthesise([header], [symbols])
    decoded = to_uint8_image(x_hat)
    finished = time.perf_counter()
    if not np.array_equal(symbols.y, batch.y_symbols[0]):
        raise AssertionError(f"{image_name}: decoded latents differ from the encoder's")
    psnr, ms_ssim = image_quality(pixels, decoded)
    return ImageResult(
        codec=name, rate=f"{codec.model.rate_of(quality):g}", quality=quality, image=image_name,
        width=header.width, height=header.height, num_bytes=len(data),
        bpp=8 * len(data) / (header.width * header.height), psnr=psnr, ms_ssim=ms_ssim,
        encode_seconds=encoded - started, decode_seconds=finished - encoded,
    )


SUMMARY_MEANS = ("bpp", "psnr", "ms_ssim", "encode_seconds", "decode_seconds")  # ImageResult fields averaged


def result_means(results: Sequence[Any]) -> dict[str, float]:
    """The mean of each of :data:`SUMMARY_MEANS` over ``results`` (ImageResults, or rows with those fields)."""
    return {key: statistics.fmean(getattr(r, key) for r in results) for key in SUMMARY_MEANS}


def summarise_results(results: list[ImageResult], dataset: str, command: str) -> dict[str, Any]:
    """Mean bpp/PSNR/MS-SSIM/timings over images, with provenance."""
    summary = {
        "dataset": dataset,
        "images": len(results),
        **result_means(results),
        "date": now_utc(),
        "machine": machine_description(),
        "command": command,
    }
    # the published curve is measured on Kodak: a gap to it means something there only
    summary["anchor_gap"] = anchor_gap(summary["bpp"], summary["psnr"]) if dataset.startswith("kodak") else None
    return summary
