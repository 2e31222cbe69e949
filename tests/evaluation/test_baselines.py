"""Classical baselines on a Kodak crop: round trips, rate ordering, clear refusals, AVIF beating JPEG."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ncpipe import metrics
from ncpipe.evaluation import baselines
from ncpipe.evaluation.bdrate import bd_rate

KODAK = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "kodak"
AVAILABLE = baselines.available_baselines()
# Every (codec, library) pair the registry knows and this environment can run.
BACKENDS = [
    (name, backend.library)
    for name, options in baselines._BACKENDS.items()
    for backend in options
    if backend.available()
]


@pytest.fixture(scope="module")
def crop() -> np.ndarray:
    path = KODAK / "kodim23.png"
    if not path.is_file():
        pytest.skip(f"Kodak images not found at {KODAK} (expected at ../shared/data/kodak from the repo root)")
    return np.asarray(Image.open(path).convert("RGB"))[128:320, 256:448]


def test_registry_covers_every_baseline():
    assert set(baselines._BACKENDS) == set(baselines.BASELINE_NAMES) == set(baselines.QUALITY_LEVELS)
    assert "jpeg" in AVAILABLE  # libjpeg is in every imagecodecs and Pillow build


@pytest.mark.parametrize(("name", "library"), BACKENDS, ids=[f"{n}-{lib}" for n, lib in BACKENDS])
def test_round_trip_and_bytes_fall_with_quality(crop, name, library):
    codec = baselines.ClassicalCodec(name, baselines.QUALITY_LEVELS[name], library)
    sizes = [len(codec.encode(crop, q)) for q in codec.quality_levels]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes), f"{name}/{library} sizes {sizes}"
    worst, best = (baselines.run_baseline(codec, crop, q) for q in (codec.quality_levels[0], codec.quality_levels[-1]))
    assert best.psnr > 32 and best.psnr > worst.psnr + 8
    assert 0 < worst.ms_ssim < best.ms_ssim <= 1


def test_result_fields(crop):
    result = baselines.run_baseline(AVAILABLE["jpeg"], crop, 50)
    assert result.codec == "jpeg" and result.quality == 50
    assert result.bpp == pytest.approx(result.num_bytes * 8 / (192 * 192))
    assert result.encode_seconds > 0 and result.decode_seconds > 0


@pytest.mark.skipif(not {"jpeg", "avif"} <= set(AVAILABLE), reason="needs jpeg and avif baselines")
def test_avif_saves_bits_over_jpeg(crop):
    curves = {name: _rd_curve(AVAILABLE[name], crop) for name in ("jpeg", "avif")}
    assert -70 < bd_rate(*curves["jpeg"], *curves["avif"]) < -20


def _rd_curve(codec: baselines.ClassicalCodec, pixels: np.ndarray) -> tuple[list[float], list[float]]:
    """(bpp, PSNR) at each quality level; PSNR only, as MS-SSIM would cost most of the test's time."""
    reference, rates, psnrs = metrics.to_unit_float(pixels), [], []
    for quality in codec.quality_levels:
        data = codec.encode(pixels, quality)
        rates.append(len(data) * 8 / (pixels.shape[0] * pixels.shape[1]))
        psnrs.append(metrics.psnr(reference, metrics.to_unit_float(codec.decode(data))).item())
    return rates, psnrs


def test_unknown_or_missing_baseline_is_named(monkeypatch):
    with pytest.raises(ValueError, match="heic"):
        baselines.get_baselines(["jpeg", "heic"])
    unavailable = tuple(dataclasses.replace(b, available=lambda: False) for b in baselines._BACKENDS["webp"])
    monkeypatch.setitem(baselines._BACKENDS, "webp", unavailable)
    assert "webp" not in baselines.available_baselines()
    with pytest.raises(baselines.BaselineUnavailableError, match="webp is not available through pillow"):
        baselines.ClassicalCodec("webp", (50,), "pillow")
    with pytest.raises(baselines.BaselineUnavailableError, match=r"\['webp'\].*imagecodecs or pillow"):
        baselines.get_baselines(["jpeg", "webp"])


def test_bad_input_is_refused(crop):
    jpeg = AVAILABLE["jpeg"]
    with pytest.raises(ValueError, match="uint8"):
        jpeg.encode(crop.astype(np.float32), 50)
    with pytest.raises(ValueError, match="0..100"):
        jpeg.encode(crop, 101)
    with pytest.raises(ValueError, match="no baseline"):
        baselines.ClassicalCodec("jpegxl", (50,), "pillow")
    with pytest.raises(ValueError, match="ascend"):
        baselines.ClassicalCodec("jpeg", (50, 10))
