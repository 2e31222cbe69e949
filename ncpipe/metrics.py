"""Image quality on 8-bit RGB: PSNR, MS-SSIM and a high-frequency detail ratio.

Every metric takes (B,3,H,W) float tensors in [0,1] on any device and returns one value
per image, shape (B,). Quality is measured on what a user receives: quantize the
reconstruction with :func:`quantize_8bit` first.

    uint8 HxWx3 ──to_unit_float──► (1,3,H,W) float32 ─┐
    x_hat (B,3,H,W) ──quantize_8bit──────────────────┴─► psnr / ms_ssim / ... ─► (B,)
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_msssim import ms_ssim as _reference_ms_ssim

# Wang, Simoncelli & Bovik, "Multi-scale structural similarity for image quality
# assessment", 2003: weights of scales 1 (finest) .. 5.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
# 3 scales keep 63% of the standard weight mass; 2 would keep 33% and be little more
# than single-scale SSIM, so smaller images get NaN rather than a number that means
# something else.
MIN_MS_SSIM_SCALES = 3
_SSIM_WINDOW = 11
_SSIM_SIGMA = 1.5
_SSIM_K1, _SSIM_K2 = 0.01, 0.03


def to_unit_float(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 HxWx3 array -> (1,3,H,W), or uint8 (B,3,H,W) tensor -> (B,3,H,W); float32 in [0,1]."""
    if isinstance(pixels, np.ndarray):
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 uint8 array, got {pixels.dtype} {pixels.shape}")
        # astype copies, so read-only arrays (np.asarray of a PIL image) are never wrapped.
        return torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1)[None].contiguous().div_(255.0)
    if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"expected a (B,3,H,W) uint8 tensor, got {pixels.dtype} {tuple(pixels.shape)}")
    return pixels.float().div_(255.0)


def quantize_8bit(x: torch.Tensor) -> torch.Tensor:
    """Clamp to [0,1] and round to the nearest of the 256 levels, as PNG export does."""
    return x.clamp(0.0, 1.0).mul(255.0).round_().div_(255.0)


def psnr(reference: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB (peak 1.0), shape (B,); identical images give +inf."""
    _check_pair(reference, reconstruction)
    mse = torch.mean((reference - reconstruction).square(), dim=(1, 2, 3), dtype=torch.float64)
    return (-10.0 * torch.log10(mse)).to(reference.dtype)


def ms_ssim_scales(height: int, width: int) -> int:
    """Number of MS-SSIM scales an image supports: the coarsest must still hold an 11 px window.

    Scale s (1-based) sees the image downsampled s-1 times, which needs
    min(height, width) > 10 * 2**(s-1); 5 scales (the standard) needs > 160 px.
    """
    side, scales = min(height, width), 0
    while scales < len(MS_SSIM_WEIGHTS) and side > (_SSIM_WINDOW - 1) * 2**scales:
        scales += 1
    return scales


def ms_ssim(reference: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Per-image MS-SSIM (data range 1), shape (B,).

    Smaller side > 160 px: standard 5-scale MS-SSIM, computed by ``pytorch_msssim.ms_ssim``.
    Smaller side 41..160 px: the finest 3 or 4 scales (see :func:`ms_ssim_scales`) with the
    standard weights of those scales renormalised to sum to 1, the coarsest kept scale
    carrying the luminance term; same window, constants and downsampling as the 5-scale
    case. Scores from different scale counts are not interchangeable: compare images of
    like size. Smaller side <= 40 px: NaN.
    """
    _check_pair(reference, reconstruction)
    scales = ms_ssim_scales(*reference.shape[-2:])
    if scales == len(MS_SSIM_WEIGHTS):
        return _reference_ms_ssim(reference, reconstruction, data_range=1.0, size_average=False)
    if scales < MIN_MS_SSIM_SCALES:
        return reference.new_full(reference.shape[:1], math.nan)
    weights = MS_SSIM_WEIGHTS[:scales]
    total = sum(weights)
    return _ms_ssim(reference, reconstruction, tuple(w / total for w in weights))


def high_frequency_energy_ratio(
    reference: torch.Tensor, reconstruction: torch.Tensor, cutoff: float = 0.25
) -> torch.Tensor:
    """Spectral energy above ``cutoff`` in the reconstruction over that in the reference, (B,).

    ``cutoff`` is a radial frequency normalised so that 1.0 is the Nyquist frequency
    (0.5 cycles/pixel) along an axis. Each channel is mean-removed and Hann-windowed
    before the FFT, so the image borders do not add spurious high frequencies. ~1 means
    as much fine detail as the original, < 1 blurrier, > 1 added detail or noise. NaN
    where the reference has no energy above the cutoff (a flat image).
    """
    _check_pair(reference, reconstruction)
    if not 0.0 < cutoff < 1.0:
        raise ValueError(f"cutoff must lie in (0, 1) (1 = Nyquist), got {cutoff}")
    mask = _radial_frequency(*reference.shape[-2:], reference.device) > cutoff
    energy_ref = _high_frequency_energy(reference, mask)
    energy_rec = _high_frequency_energy(reconstruction, mask)
    ratio = energy_rec / energy_ref.clamp_min(torch.finfo(energy_ref.dtype).tiny)
    return torch.where(energy_ref > 0, ratio, torch.full_like(ratio, math.nan))


def _check_pair(reference: torch.Tensor, reconstruction: torch.Tensor) -> None:
    if reference.ndim != 4 or reference.shape != reconstruction.shape:
        raise ValueError(
            f"expected two (B,C,H,W) tensors of one shape, got {tuple(reference.shape)} "
            f"and {tuple(reconstruction.shape)}"
        )
    if not (reference.is_floating_point() and reconstruction.is_floating_point()):
        raise ValueError("expected float tensors in [0,1]; convert uint8 with to_unit_float")


def _ms_ssim(x: torch.Tensor, y: torch.Tensor, weights: tuple[float, ...]) -> torch.Tensor:
    """MS-SSIM over len(weights) scales: contrast-structure at each but the coarsest, SSIM there."""
    window = _gaussian_window(x)
    terms = []
    for scale in range(len(weights)):
        ssim, contrast_structure = _ssim_terms(x, y, window)
        if scale < len(weights) - 1:
            terms.append(contrast_structure.relu())
            x, y = _halve(x), _halve(y)
    terms.append(ssim.relu())
    per_channel = torch.prod(torch.stack(terms) ** x.new_tensor(weights).view(-1, 1, 1), dim=0)
    return per_channel.mean(dim=1)


def _ssim_terms(x: torch.Tensor, y: torch.Tensor, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean SSIM and mean contrast-structure term per (image, channel), Gaussian-weighted, valid region."""
    c1, c2 = _SSIM_K1**2, _SSIM_K2**2
    mu_x, mu_y = _blur(x, window), _blur(y, window)
    var_x = _blur(x * x, window) - mu_x.square()
    var_y = _blur(y * y, window) - mu_y.square()
    cov_xy = _blur(x * y, window) - mu_x * mu_y
    luminance = (2 * mu_x * mu_y + c1) / (mu_x.square() + mu_y.square() + c1)
    contrast_structure = (2 * cov_xy + c2) / (var_x + var_y + c2)
    return (luminance * contrast_structure).mean(dim=(-2, -1)), contrast_structure.mean(dim=(-2, -1))


def _gaussian_window(like: torch.Tensor) -> torch.Tensor:
    offsets = torch.arange(_SSIM_WINDOW, dtype=like.dtype, device=like.device) - _SSIM_WINDOW // 2
    window = torch.exp(-offsets.square() / (2 * _SSIM_SIGMA**2))
    return window / window.sum()


def _blur(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter per channel, no padding (output shrinks by the window size - 1)."""
    channels = x.shape[1]
    x = F.conv2d(x, window.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    return F.conv2d(x, window.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)


def _halve(x: torch.Tensor) -> torch.Tensor:
    # Odd sides are padded so no row or column is dropped, as pytorch_msssim does for
    # its 5 scales; the reduced-scale path then agrees with it scale for scale.
    return F.avg_pool2d(x, kernel_size=2, padding=[x.shape[-2] % 2, x.shape[-1] % 2])


def _radial_frequency(height: int, width: int, device: torch.device) -> torch.Tensor:
    """|f| of every FFT bin, in units of the Nyquist frequency, shape (H, W)."""
    fy = torch.fft.fftfreq(height, device=device).view(-1, 1)
    fx = torch.fft.fftfreq(width, device=device).view(1, -1)
    return torch.sqrt(fy.square() + fx.square()) / 0.5


def _high_frequency_energy(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    height, width = x.shape[-2:]
    window = torch.outer(
        torch.hann_window(height, periodic=False, dtype=x.dtype, device=x.device),
        torch.hann_window(width, periodic=False, dtype=x.dtype, device=x.device),
    )
    centred = x - x.mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(centred * window).abs().square()
    return (power * mask).sum(dim=(1, 2, 3))
