"""RD and sweep plots are written as real PNGs, with one coloured line per group."""

import numpy as np
import pytest
from PIL import Image

from ncpipe.evaluation.plots import plot_rd, plot_sweep

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROWS = [
    {"codec": codec, "quality": q, "bpp": bpp, "psnr": psnr, "ms_ssim": float("nan") if q == 3 else 0.9}
    for codec, points in {
        "jpeg": [(3, 0.09, 21.0), (50, 0.78, 30.1), (85, 1.68, 35.2), (20, 0.40, 27.0)],
        "avif": [(10, 0.07, 24.5), (50, 0.57, 32.4), (80, 1.48, 37.5)],
    }.items()
    for q, bpp, psnr in points
]


def _colours(path) -> set[tuple[int, int, int]]:
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    return {tuple(p) for p in pixels}


def test_plot_rd_writes_a_png_with_a_line_per_codec(tmp_path):
    path = plot_rd(ROWS, path=tmp_path / "rd.png")
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert Image.open(path).size == (640, 480)
    colours = _colours(path)
    assert (31, 119, 180) in colours and (255, 127, 14) in colours  # matplotlib's first two line colours
    assert not list(tmp_path.glob(".*partial"))


def test_plot_sweep_skips_non_finite_points_and_annotates(tmp_path, caplog):
    path = plot_sweep(ROWS, path=tmp_path / "sweep.png", x="bpp", y="ms_ssim", annotate="quality", log_x=True)
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert "left out 1 of 7 points" in caplog.text
    assert (31, 119, 180) in _colours(path) and (255, 127, 14) not in _colours(path)  # one series only


def test_missing_column_or_no_points_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['lpips'\]"):
        plot_rd(ROWS, path=tmp_path / "x.png", y="lpips")
    with pytest.raises(ValueError, match="no rows"):
        plot_rd([], path=tmp_path / "x.png")
    with pytest.raises(ValueError, match="finite"):
        plot_sweep(ROWS[:1], path=tmp_path / "x.png", x="bpp", y="ms_ssim")
    assert not (tmp_path / "x.png").exists()
