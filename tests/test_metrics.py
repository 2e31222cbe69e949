"""Quality metrics on crops of Kodak images: hand-checked PSNR, MS-SSIM at every size rule, detail ratio."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pytorch_msssim import ms_ssim as reference_ms_ssim

from ncpipe import metrics

KODAK = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kodak"


@pytest.fixture(scope="module")
def kodim05() -> np.ndarray:
    path = KODAK / "kodim05.png"
    if not path.is_file():
        pytest.skip(f"Kodak images not found at {KODAK} (expected at ../shared/data/kodak from the repo root)")
    return np.asarray(Image.open(path).convert("RGB"))


def _noisy(pixels: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0.0, sigma, pixels.shape)
    return np.clip(np.round(pixels + noise), 0, 255).astype(np.uint8)


def _pair(pixels: np.ndarray, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    return metrics.to_unit_float(pixels), metrics.to_unit_float(_noisy(pixels, sigma))


def test_to_unit_float_layouts(kodim05):
    crop = kodim05[:16, :24]
    single = metrics.to_unit_float(crop)
    assert single.shape == (1, 3, 16, 24) and single.dtype == torch.float32
    assert torch.equal(single[0, 1] * 255, torch.from_numpy(crop[..., 1].astype(np.float32)))
    batch = torch.from_numpy(np.stack([crop, crop[::-1]])).permute(0, 3, 1, 2)
    assert torch.equal(metrics.to_unit_float(batch)[0], single[0])
    with pytest.raises(ValueError, match="uint8"):
        metrics.to_unit_float(crop.astype(np.float32))


def test_quantize_8bit_rounds_to_the_png_grid(kodim05):
    x_hat = torch.rand(1, 3, 20, 30, generator=torch.Generator().manual_seed(0)) * 1.4 - 0.2
    received = metrics.quantize_8bit(x_hat)
    as_png = Image.fromarray((received[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    assert torch.equal(metrics.to_unit_float(np.asarray(as_png)), received)  # PNG export loses nothing more
    assert (received - x_hat.clamp(0, 1)).abs().max() <= 0.5 / 255 + 1e-7  # nearest level, not truncation
    assert received.min() == 0 and received.max() == 1
    on_grid = metrics.to_unit_float(kodim05[:32, :32])
    assert torch.equal(metrics.quantize_8bit(on_grid), on_grid)


def test_psnr_matches_hand_computation(kodim05):
    crop = kodim05[100:164, 200:296]
    noisy = _noisy(crop, 6.0)
    mse = np.mean((crop.astype(np.float64) - noisy) ** 2)
    expected = 10 * np.log10(255.0**2 / mse)
    got = metrics.psnr(metrics.to_unit_float(crop), metrics.to_unit_float(noisy))
    assert got.shape == (1,)
    assert got.item() == pytest.approx(expected, abs=1e-4)


def test_psnr_identical_is_inf(kodim05):
    x = metrics.to_unit_float(kodim05[:32, :32])
    assert torch.isposinf(metrics.psnr(x, x)).all()


@pytest.mark.parametrize("size", [168, 64], ids=["5-scale", "3-scale"])
def test_batch_equals_single(kodim05, size):
    crops = [kodim05[:size, :size], kodim05[200 : 200 + size, 300 : 300 + size]]
    pairs = [_pair(c, 8.0) for c in crops]
    ref, rec = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    for metric in (metrics.psnr, metrics.ms_ssim, metrics.high_frequency_energy_ratio):
        batched = metric(ref, rec)
        singles = torch.cat([metric(a, b) for a, b in pairs])
        torch.testing.assert_close(batched, singles, rtol=1e-5, atol=1e-6)


def test_ms_ssim_standard_size_is_pytorch_msssim(kodim05):
    ref, rec = _pair(kodim05[:168, :176], 10.0)
    expected = reference_ms_ssim(ref, rec, data_range=1.0, size_average=False)
    torch.testing.assert_close(metrics.ms_ssim(ref, rec), expected, rtol=0, atol=0)
    # The reduced-scale implementation, run at 5 scales, must agree with the reference too.
    own = metrics._ms_ssim(ref, rec, metrics.MS_SSIM_WEIGHTS)
    torch.testing.assert_close(own, expected, rtol=0, atol=2e-6)


def test_ms_ssim_scale_rule():
    assert [metrics.ms_ssim_scales(s, 500) for s in (161, 160, 81, 64, 41, 40, 11, 10)] == [5, 4, 4, 3, 3, 2, 1, 0]


def test_ms_ssim_small_image_uses_fewer_scales(kodim05):
    crop = kodim05[300:364, 400:464]
    ref = metrics.to_unit_float(crop)
    mild, strong = (metrics.ms_ssim(ref, metrics.to_unit_float(_noisy(crop, s))) for s in (4.0, 16.0))
    assert torch.isfinite(mild).all() and 0 < strong.item() < mild.item() < 1
    assert metrics.ms_ssim(ref, ref).item() == pytest.approx(1.0, abs=1e-6)


def test_ms_ssim_below_minimum_is_nan(kodim05):
    ref, rec = _pair(kodim05[:40, :64], 4.0)
    assert torch.isnan(metrics.ms_ssim(ref, rec)).all()
    ref, rec = _pair(kodim05[:41, :64], 4.0)
    assert torch.isfinite(metrics.ms_ssim(ref, rec)).all()


def test_high_frequency_ratio_tracks_detail(kodim05):
    ref = metrics.to_unit_float(kodim05[:128, :192])
    blurred = F.interpolate(F.avg_pool2d(ref, 4), scale_factor=4, mode="bilinear", align_corners=False)
    noisy = metrics.to_unit_float(_noisy(kodim05[:128, :192], 12.0))
    assert metrics.high_frequency_energy_ratio(ref, ref).item() == pytest.approx(1.0, rel=1e-6)
    assert metrics.high_frequency_energy_ratio(ref, blurred).item() < 0.2
    assert metrics.high_frequency_energy_ratio(ref, noisy).item() > 1.2


def test_high_frequency_ratio_flat_reference_is_nan():
    flat = torch.full((1, 3, 32, 32), 0.5)
    assert torch.isnan(metrics.high_frequency_energy_ratio(flat, torch.rand(1, 3, 32, 32))).all()
    with pytest.raises(ValueError, match="cutoff"):
        metrics.high_frequency_energy_ratio(flat, flat, cutoff=1.5)


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError, match="one shape"):
        metrics.psnr(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("size", [192, 64], ids=["5-scale", "3-scale"])
def test_cuda_matches_cpu(kodim05, size):
    ref, rec = _pair(kodim05[:size, :size], 8.0)
    for metric in (metrics.psnr, metrics.ms_ssim, metrics.high_frequency_energy_ratio):
        on_cuda = metric(ref.cuda(), rec.cuda())
        assert on_cuda.is_cuda
        torch.testing.assert_close(on_cuda.cpu(), metric(ref, rec), rtol=1e-4, atol=1e-5)
