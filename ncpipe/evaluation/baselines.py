"""Classical codecs (JPEG, WebP, AVIF, JPEG XL) as rate-distortion baselines.

Each codec is coded through imagecodecs where its library is built in, else through
Pillow; JPEG XL has no Pillow path. Settings, fixed so that runs compare:

- jpeg:   libjpeg-turbo, 4:2:0 chroma, optimised Huffman tables.
- webp:   libwebp lossy (imagecodecs' default is *lossless*), method 4 (cwebp's default).
- avif:   libavif + libaom, 8-bit 4:2:0, speed 6 (avifenc's default). On kodim05 + kodim23,
          PSNR BD-rate against speed 6: speed 4 -5.5% at 7x the encode time, speed 8
          +11.5% at 0.4x; imagecodecs' own default speed is slower still.
- jpegxl: libjxl, effort 7 (cjxl's default), quality mapped to distance by libjxl.

Encoders run single-threaded so timings compare across codecs and with one Ray worker
per core. Sizes are whole files, headers included, as ncpipe's own bitstreams are.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import imagecodecs
import numpy as np
from PIL import Image, features

from ncpipe import metrics
from ncpipe.errors import NcpipeError

log = logging.getLogger(__name__)

BASELINE_NAMES = ("jpeg", "webp", "avif", "jpegxl")

# Quality levels spanning ~0.05-1.5 bpp on Kodak. Mean bpp of ClassicalCodec.encode over
# kodim01/04/15/23 (768x512), imagecodecs backend, settings above:
#   jpeg   q 1:0.084 3:0.092 5:0.129 10:0.229 20:0.401 30:0.545 50:0.780 70:1.096 80:1.411 85:1.682
#   webp   q 0:0.092 5:0.191 10:0.242 20:0.337 30:0.433 50:0.617 70:0.812 80:1.074 85:1.349 88:1.597
#   avif   q 0:0.030 5:0.052 10:0.072 20:0.136 30:0.227 40:0.370 50:0.570 60:0.871 70:1.128 80:1.478
#   jpegxl q 0:0.113 10:0.159 20:0.261 30:0.350 50:0.452 60:0.549 70:0.714 80:1.019 85:1.283 88:1.518
# JPEG, WebP and JPEG XL cannot reach 0.05 bpp on Kodak; their lowest levels are their floors.
# Pillow's AVIF maps quality differently (about 25% fewer bytes at q50), so its bpp shift.
QUALITY_LEVELS: dict[str, tuple[int, ...]] = {
    "jpeg": (3, 5, 10, 20, 30, 50, 70, 80, 85),
    "webp": (0, 5, 10, 20, 30, 50, 70, 80, 88),
    "avif": (5, 10, 20, 30, 40, 50, 60, 70, 80),
    "jpegxl": (0, 10, 20, 30, 50, 60, 70, 80, 88),
}

AVIF_SPEED = 6
WEBP_METHOD = 4
JPEGXL_EFFORT = 7


class BaselineUnavailableError(NcpipeError, RuntimeError):
    """A baseline codec that a run asked for cannot be used here; the message names it."""


@dataclass(frozen=True)
class _Backend:
    library: str
    available: Callable[[], bool]
    encode: Callable[[np.ndarray, int], bytes]
    decode: Callable[[bytes], np.ndarray]


def _pillow_encode(fmt: str, **options: object) -> Callable[[np.ndarray, int], bytes]:
    def encode(pixels: np.ndarray, quality: int) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, fmt, quality=quality, **options)
        return buffer.getvalue()

    return encode


def _pillow_decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def _imagecodecs_avif_encode(pixels: np.ndarray, quality: int) -> bytes:
    return imagecodecs.avif_encode(
        pixels, quality, speed=AVIF_SPEED, pixelformat="yuv420", codec="aom", bitspersample=8, numthreads=1
    )


def _imagecodecs_avif_available() -> bool:
    # libavif may be built with another AV1 encoder only; the quality levels assume libaom.
    if not imagecodecs.AVIF.available:
        return False
    try:
        _imagecodecs_avif_encode(np.zeros((8, 8, 3), np.uint8), 50)
    except imagecodecs.AvifError:
        return False
    return True


# name -> backends in order of preference.
_BACKENDS: dict[str, tuple[_Backend, ...]] = {
    "jpeg": (
        _Backend(
            "imagecodecs",
            lambda: bool(imagecodecs.JPEG8.available),
            lambda x, q: imagecodecs.jpeg8_encode(x, q, subsampling="420", optimize=True),
            imagecodecs.jpeg8_decode,
        ),
        _Backend(
            "pillow",
            lambda: features.check("jpg"),
            _pillow_encode("JPEG", subsampling=2, optimize=True),
            _pillow_decode,
        ),
    ),
    "webp": (
        _Backend(
            "imagecodecs",
            lambda: bool(imagecodecs.WEBP.available),
            lambda x, q: imagecodecs.webp_encode(x, q, lossless=False, method=WEBP_METHOD),
            imagecodecs.webp_decode,
        ),
        _Backend(
            "pillow",
            lambda: features.check("webp"),
            _pillow_encode("WEBP", lossless=False, method=WEBP_METHOD),
            _pillow_decode,
        ),
    ),
    "avif": (
        _Backend(
            "imagecodecs",
            _imagecodecs_avif_available,
            _imagecodecs_avif_encode,
            lambda data: imagecodecs.avif_decode(data, numthreads=1),
        ),
        _Backend(
            "pillow",
            lambda: features.check("avif"),
            _pillow_encode("AVIF", speed=AVIF_SPEED, subsampling="4:2:0", max_threads=1),
            _pillow_decode,
        ),
    ),
    "jpegxl": (
        _Backend(
            "imagecodecs",
            lambda: bool(imagecodecs.JPEGXL.available),
            lambda x, q: imagecodecs.jpegxl_encode(x, q, effort=JPEGXL_EFFORT, numthreads=1),
            lambda data: imagecodecs.jpegxl_decode(data, numthreads=1),
        ),
    ),
}


@dataclass(frozen=True)
class ClassicalCodec:
    """One classical codec through one library; ``quality`` is the library's 0-100 scale."""

    name: str
    quality_levels: tuple[int, ...]
    backend: str = "imagecodecs"

    def __post_init__(self) -> None:
        if not _backend(self.name, self.backend).available():
            raise BaselineUnavailableError(f"{self.name} is not available through {self.backend} here")
        levels = list(self.quality_levels)
        if not levels or levels != sorted(set(levels)) or not 0 <= levels[0] <= levels[-1] <= 100:
            raise ValueError(f"{self.name}: quality_levels must ascend without repeats within 0..100, got {levels}")

    def encode(self, pixels: np.ndarray, quality: int) -> bytes:
        """HxWx3 uint8 RGB -> file bytes."""
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ValueError(f"{self.name}: expected HxWx3 uint8 pixels, got {pixels.dtype} {pixels.shape}")
        if not 0 <= quality <= 100:
            raise ValueError(f"{self.name}: quality must be in 0..100, got {quality}")
        return bytes(_backend(self.name, self.backend).encode(np.ascontiguousarray(pixels), int(quality)))

    def decode(self, data: bytes) -> np.ndarray:
        """File bytes -> HxWx3 uint8 RGB."""
        pixels = np.asarray(_backend(self.name, self.backend).decode(data))
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ValueError(f"{self.name}: decoder returned {pixels.dtype} {pixels.shape}, not HxWx3 uint8")
        return pixels


@dataclass(frozen=True)
class BaselineResult:
    """One image coded at one quality; psnr and ms_ssim on 8-bit RGB (see ncpipe.metrics)."""

    codec: str
    quality: int
    num_bytes: int
    bpp: float
    encode_seconds: float
    decode_seconds: float
    psnr: float
    ms_ssim: float


def available_baselines() -> dict[str, ClassicalCodec]:
    """The baselines usable here, by name, each through its preferred available library."""
    found = {}
    for name in BASELINE_NAMES:
        backend = next((b for b in _BACKENDS[name] if b.available()), None)
        if backend is None:
            log.info("baseline %s unavailable: %s", name, _missing_reason(name))
        else:
            found[name] = ClassicalCodec(name, QUALITY_LEVELS[name], backend.library)
    return found


def get_baselines(names: Iterable[str]) -> dict[str, ClassicalCodec]:
    """The named baselines; raise naming every one that is unknown or unavailable here."""
    names = list(names)
    unknown = [n for n in names if n not in _BACKENDS]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; known: {list(BASELINE_NAMES)}")
    found = available_baselines()
    missing = [n for n in names if n not in found]
    if missing:
        reasons = "; ".join(f"{n}: {_missing_reason(n)}" for n in missing)
        raise BaselineUnavailableError(f"baseline(s) {missing} unavailable here ({reasons})")
    return {n: found[n] for n in names}


def run_baseline(codec: ClassicalCodec, pixels: np.ndarray, quality: int) -> BaselineResult:
    """Encode and decode ``pixels`` once, timing both, and score the decoded image."""
    started = time.perf_counter()
    data = codec.encode(pixels, quality)
    encoded = time.perf_counter()
    decoded = codec.decode(data)
    decode_seconds = time.perf_counter() - encoded
    if decoded.shape != pixels.shape:
        raise ValueError(f"{codec.name} q{quality}: decoded shape {decoded.shape} != input {pixels.shape}")
    reference, received = metrics.to_unit_float(pixels), metrics.to_unit_float(decoded)
    height, width = pixels.shape[:2]
    return BaselineResult(
        codec=codec.name,
        quality=quality,
        num_bytes=len(data),
        bpp=len(data) * 8 / (height * width),
        encode_seconds=encoded - started,
        decode_seconds=decode_seconds,
        psnr=float(metrics.psnr(reference, received)[0]),
        ms_ssim=float(metrics.ms_ssim(reference, received)[0]),
    )


def sweep(codec: ClassicalCodec, pixels: np.ndarray) -> list[BaselineResult]:
    """:func:`run_baseline` at each of the codec's quality levels."""
    return [run_baseline(codec, pixels, quality) for quality in codec.quality_levels]


def _backend(name: str, library: str) -> _Backend:
    for backend in _BACKENDS.get(name, ()):
        if backend.library == library:
            return backend
    known = {n: [b.library for b in bs] for n, bs in _BACKENDS.items()}
    raise ValueError(f"no baseline {name!r} through {library!r}; known: {known}")


def _missing_reason(name: str) -> str:
    tried = " or ".join(b.library for b in _BACKENDS[name])
    needs = " with libaom" if name == "avif" else ""
    return f"{name}{needs} is not built into {tried} here; install an imagecodecs wheel with {name}{needs}"
