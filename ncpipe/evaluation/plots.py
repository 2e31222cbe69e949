"""Rate-distortion and sweep plots, written as PNG files.

Input is a sequence of row mappings, one point per row: ``[dataclasses.asdict(r) for r in
results]`` or ``pyarrow_table.to_pylist()``. Rows are grouped into one line per value of
a ``group`` column and each line is drawn in ascending ``x``. Drawing uses a private
Agg canvas, never pyplot, so nothing global changes and it is safe in workers.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ncpipe.io.storage import write_bytes_atomic

log = logging.getLogger(__name__)

Rows = Sequence[Mapping[str, object]]

AXIS_LABELS = {
    "bpp": "rate (bits per pixel)",
    "psnr": "PSNR (dB, 8-bit RGB)",
    "ms_ssim": "MS-SSIM",
    "ms_ssim_db": "MS-SSIM (dB)",
    "encode_seconds": "encode time (s)",
    "decode_seconds": "decode time (s)",
}
_MARKERS = "osD^vP*Xh<>"


def plot_rd(
    rows: Rows, *, path: str | Path, x: str = "bpp", y: str = "psnr", group: str = "codec", title: str | None = None
) -> Path:
    """One rate-distortion line per ``group`` value; returns the PNG's path."""
    title = title or f"Rate-distortion: {_label(y)} vs {_label(x)}"
    return plot_sweep(rows, path=path, x=x, y=y, group=group, title=title)


def plot_sweep(
    rows: Rows,
    *,
    path: str | Path,
    x: str,
    y: str,
    group: str | None = None,
    annotate: str | None = None,
    log_x: bool = False,
    title: str | None = None,
) -> Path:
    """``y`` against ``x``, one line per ``group`` value (one line if None); returns the PNG's path.

    ``annotate`` names a column written beside each point (a quality level, a knob value).
    Points whose x or y is not finite (an MS-SSIM NaN) are left out, with a warning.
    """
    figure = Figure(figsize=(6.4, 4.8), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for index, (name, points) in enumerate(_series(rows, x, y, group, annotate).items()):
        xs, ys, _ = zip(*points)
        axes.plot(xs, ys, marker=_MARKERS[index % len(_MARKERS)], label=name)
        if annotate is not None:
            for xi, yi, note in points:
                axes.annotate(str(note), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if log_x:
        axes.set_xscale("log")
    axes.set_xlabel(_label(x))
    axes.set_ylabel(_label(y))
    axes.set_title(title or f"{_label(y)} vs {_label(x)}")
    axes.grid(True, alpha=0.3)
    if group is not None:
        axes.legend(title=group)
    return _save(figure, Path(path))


def _series(
    rows: Rows, x: str, y: str, group: str | None, annotate: str | None
) -> dict[str, list[tuple[float, float, object]]]:
    """Group name -> [(x, y, note)] sorted by x, groups in order of first appearance."""
    if not rows:
        raise ValueError("nothing to plot: no rows")
    needed = [c for c in (x, y, group, annotate) if c is not None]
    series: dict[str, list[tuple[float, float, object]]] = {}
    dropped = 0
    for index, row in enumerate(rows):
        missing = [c for c in needed if c not in row]
        if missing:
            raise ValueError(f"row {index} lacks column(s) {missing}; it has {sorted(row)}")
        xv, yv = float(row[x]), float(row[y])
        if not (math.isfinite(xv) and math.isfinite(yv)):
            dropped += 1
            continue
        name = str(row[group]) if group is not None else y
        series.setdefault(name, []).append((xv, yv, row[annotate] if annotate else None))
    if dropped:
        log.warning("left out %d of %d points with a non-finite %s or %s", dropped, len(rows), x, y)
    if not series:
        raise ValueError(f"nothing to plot: no row has a finite {x} and {y}")
    return {name: sorted(points, key=lambda p: p[0]) for name, points in series.items()}


def _label(column: str) -> str:
    return AXIS_LABELS.get(column, column.replace("_", " "))


def _save(figure: Figure, path: Path) -> Path:
    # Write beside the target, then rename, so a killed run never leaves a truncated PNG.
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    write_bytes_atomic(str(path), buffer.getvalue())
    return path
