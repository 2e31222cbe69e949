"""Bjøntegaard deltas on curves whose answer is known analytically, and refusal of bad curves."""

import math

import numpy as np
import pytest

from ncpipe.evaluation.bdrate import bd_psnr, bd_rate

# A realistic codec curve: bpp and PSNR of a learned codec on Kodak.
RATE = [0.124, 0.307, 0.662, 1.234]
PSNR = [27.70, 31.12, 34.95, 38.79]


def test_identical_curves():
    assert bd_rate(RATE, PSNR, RATE, PSNR) == 0.0
    assert bd_psnr(RATE, PSNR, RATE, PSNR) == 0.0


def test_every_rate_scaled_by_0_8_saves_20_percent():
    assert bd_rate(RATE, PSNR, [0.8 * r for r in RATE], PSNR) == pytest.approx(-20.0, abs=1e-9)
    assert bd_rate([0.8 * r for r in RATE], PSNR, RATE, PSNR) == pytest.approx(25.0, abs=1e-9)


def test_quality_shifted_by_half_a_db():
    assert bd_psnr(RATE, PSNR, RATE, [p + 0.5 for p in PSNR]) == pytest.approx(0.5, abs=1e-12)


def test_points_may_be_unsorted_and_two_suffice():
    order = [2, 0, 3, 1]
    shuffled_rate, shuffled_psnr = [RATE[i] for i in order], [PSNR[i] for i in order]
    assert bd_rate(RATE, PSNR, shuffled_rate, shuffled_psnr) == 0.0
    # Two points: PCHIP is a line in (quality, ln rate); b = a * 0.9 everywhere.
    assert bd_rate([0.2, 1.0], [30, 36], [0.18, 0.9], [30, 36]) == pytest.approx(-10.0, abs=1e-9)


def test_exact_for_exponential_curves_sampled_at_different_qualities():
    # ln R = 0.23 * Q + c: PCHIP reproduces straight lines, so the answer is exp(c_b - c_a) - 1
    # whatever the sample positions, once restricted to the shared quality interval.
    q_a, q_b = np.array([26.0, 29.5, 33.0, 37.0, 40.0]), np.array([28.0, 30.0, 35.0, 42.0])
    rate_a, rate_b = np.exp(0.23 * q_a - 7.0), np.exp(0.23 * q_b - 7.3)
    assert bd_rate(rate_a, q_a, rate_b, q_b) == pytest.approx(100 * math.expm1(-0.3), abs=1e-9)
    assert bd_psnr(rate_a, q_a, rate_b, q_b) == pytest.approx(0.3 / 0.23, abs=1e-9)


def test_antisymmetric_in_log_rate():
    other = ([0.1, 0.28, 0.7, 1.4], [27.0, 31.0, 35.5, 39.0])
    forward, backward = bd_rate(RATE, PSNR, *other), bd_rate(*other, RATE, PSNR)
    assert (1 + forward / 100) * (1 + backward / 100) == pytest.approx(1.0, abs=1e-12)
    assert bd_psnr(RATE, PSNR, *other) == pytest.approx(-bd_psnr(*other, RATE, PSNR), abs=1e-12)


@pytest.mark.parametrize(
    ("rate_b", "psnr_b", "message"),
    [
        ([0.5], [33.0], "at least 2 points"),
        ([0.2, 0.5, 0.9], [30.0, 33.0], "one length"),
        ([0.2, 0.5, 0.9, 1.5], [30.0, 33.0, 32.0, 36.0], "strictly increase"),
        ([0.2, 0.5, 0.5, 1.5], [30.0, 33.0, 34.0, 36.0], "strictly increase"),
        ([0.0, 0.5, 0.9, 1.5], [30.0, 33.0, 34.0, 36.0], "positive"),
        ([0.2, 0.5, 0.9, 1.5], [30.0, float("nan"), 34.0, 36.0], "finite"),
        ([2.0, 3.0, 4.0, 5.0], [40.0, 41.0, 42.0, 43.0], "do not overlap"),
    ],
)
def test_bad_curves_are_refused(rate_b, psnr_b, message):
    with pytest.raises(ValueError, match=message):
        bd_rate(RATE, PSNR, rate_b, psnr_b)


def test_rate_ranges_must_overlap_for_bd_psnr():
    with pytest.raises(ValueError, match="rate ranges do not overlap"):
        bd_psnr(RATE, PSNR, [2.0, 4.0], [30.0, 33.0])
