"""Bjøntegaard delta rate and quality between two rate-quality curves.

G. Bjøntegaard, "Calculation of average PSNR differences between RD-curves", VCEG-M33,
2001, with the piecewise cubic (PCHIP) interpolation that replaced the single cubic fit
in JVET's and AOM's reporting tools: each curve is interpolated monotonically through its
points (no overshoot between them) and integrated exactly over the interval both curves
cover; the mean gap is the delta.

Rates are any positive rate (bpp, bytes); quality is any score that rises with rate
(PSNR in dB, MS-SSIM in dB). PCHIP through 2 points is a straight line, so each curve
needs at least 2 points; 4 or more (the classic rule) give a meaningful curve.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.interpolate import PchipInterpolator

MIN_POINTS = 2


def bd_rate(
    rate_a: Sequence[float], dist_a: Sequence[float], rate_b: Sequence[float], dist_b: Sequence[float]
) -> float:
    """Mean rate change of curve b against curve a at equal quality, in percent; negative: b saves bits."""
    log_rate_a, quality_a = _curve("a", rate_a, dist_a)
    log_rate_b, quality_b = _curve("b", rate_b, dist_b)
    gap = _mean_gap(quality_a, log_rate_a, quality_b, log_rate_b, "quality")
    return float(np.expm1(gap) * 100.0)


def bd_psnr(
    rate_a: Sequence[float], dist_a: Sequence[float], rate_b: Sequence[float], dist_b: Sequence[float]
) -> float:
    """Mean quality change of curve b against curve a at equal rate (dB for PSNR); positive: b is better."""
    log_rate_a, quality_a = _curve("a", rate_a, dist_a)
    log_rate_b, quality_b = _curve("b", rate_b, dist_b)
    return _mean_gap(log_rate_a, quality_a, log_rate_b, quality_b, "rate")


def _curve(label: str, rate: Sequence[float], quality: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Validate one curve; return (ln rate, quality), sorted by rate."""
    rate, quality = np.asarray(rate, dtype=np.float64), np.asarray(quality, dtype=np.float64)
    if rate.ndim != 1 or rate.shape != quality.shape:
        raise ValueError(
            f"curve {label}: rate and quality must be 1-D of one length, got {rate.shape} and {quality.shape}"
        )
    if rate.size < MIN_POINTS:
        raise ValueError(f"curve {label}: needs at least {MIN_POINTS} points, got {rate.size}")
    if not (np.isfinite(rate).all() and np.isfinite(quality).all()):
        raise ValueError(f"curve {label}: rates and qualities must be finite, got {rate.tolist()} / {quality.tolist()}")
    if (rate <= 0).any():
        raise ValueError(f"curve {label}: rates must be positive, got {rate.tolist()}")
    order = np.argsort(rate, kind="stable")
    rate, quality = rate[order], quality[order]
    if not ((np.diff(rate) > 0).all() and (np.diff(quality) > 0).all()):
        raise ValueError(
            f"curve {label}: quality must strictly increase with rate (no repeated points); sorted by rate: "
            f"{list(zip(rate.tolist(), quality.tolist()))}"
        )
    return np.log(rate), quality


def _mean_gap(x_a: np.ndarray, y_a: np.ndarray, x_b: np.ndarray, y_b: np.ndarray, axis: str) -> float:
    """Mean of (y_b - y_a) over the x interval both curves cover, each interpolated by PCHIP."""
    low, high = max(x_a.min(), x_b.min()), min(x_a.max(), x_b.max())
    if not low < high:
        raise ValueError(
            f"the curves' {axis} ranges do not overlap: a spans [{x_a.min():.4g}, {x_a.max():.4g}], "
            f"b spans [{x_b.min():.4g}, {x_b.max():.4g}]" + (" (ln rate)" if axis == "rate" else "")
        )
    # _curve leaves rate and quality both ascending, so either may be the abscissa.
    area_a = PchipInterpolator(x_a, y_a).integrate(low, high)
    area_b = PchipInterpolator(x_b, y_b).integrate(low, high)
    return float((area_b - area_a) / (high - low))
