"""Perceptual measures and paired confidence intervals, shared by the diffusion evaluations.

* Weight-free full-reference measures from piq (a maintained library): GMSD (gradient magnitude
  similarity deviation, Xue et al. 2014; lower is better, 0 = identical) and HaarPSI (Reisenhofer et
  al. 2018; higher is better, 1 = identical). Both run on any device with no downloaded weights.
* LPIPS, DISTS and FID need pretrained network weights. ncpipe downloads nothing:
  :func:`perceptual_weights` looks for the files in ``$NCPIPE_METRIC_WEIGHTS`` (``:``-separated
  folders) and torch's hub checkpoint folder, and :func:`perceptual_message` says which are missing;
  evaluations record that sentence with their tables.
* :func:`paired_interval`: the mean of per-image differences (method − codec on the same image and
  bits) with its 95 % Student-t confidence interval over images.
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

METRIC_WEIGHTS_ENV = "NCPIPE_METRIC_WEIGHTS"
# What each perceptual metric needs, by the file names their reference implementations use.
PERCEPTUAL_WEIGHT_FILES = {
    "LPIPS (AlexNet)": ("alexnet-owt-7be5be79.pth", "lpips_alex_v0.1.pth"),
    "DISTS": ("vgg16-397923af.pth", "DISTS_weights.pt"),
    "FID (Inception, patches)": ("pt_inception-2015-12-05-6726825d.pth",),
}
CONFIDENCE = 0.95


@dataclass(frozen=True)
class FullReferenceScores:
    """Weight-free perceptual scores of one image against its original."""

    gmsd: float  # lower is better
    haarpsi: float  # higher is better


def full_reference_scores(reference: torch.Tensor, output: torch.Tensor) -> FullReferenceScores:
    """GMSD and HaarPSI of ``output`` against ``reference``, both (1, 3, H, W) in [0, 1] (piq)."""
    import piq

    reference, output = reference.float().clamp(0, 1), output.float().clamp(0, 1)
    return FullReferenceScores(gmsd=float(piq.gmsd(output, reference, data_range=1.0)),
                               haarpsi=float(piq.haarpsi(output, reference, data_range=1.0)))


@dataclass(frozen=True)
class Interval:
    """Mean of paired differences over n images with its 95 % confidence interval (NaN bounds for n < 2)."""

    mean: float
    low: float
    high: float
    n: int

    def text(self, digits: int = 3) -> str:
        if math.isnan(self.low):
            return f"{self.mean:+.{digits}f}"
        return f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def paired_interval(differences: Sequence[float]) -> Interval:
    """Mean ± t_{0.975, n−1} · s / sqrt(n) of per-image differences (a paired t interval)."""
    from scipy.stats import t

    values = [float(d) for d in differences]
    if not values:
        raise ValueError("no differences to summarise")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return Interval(mean, math.nan, math.nan, len(values))
    half = float(t.ppf(0.5 + CONFIDENCE / 2, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))
    return Interval(mean, mean - half, mean + half, len(values))


@dataclass(frozen=True)
class WeightStatus:
    metric: str
    needed: tuple[str, ...]
    found: tuple[str, ...]  # paths of the files found

    @property
    def missing(self) -> tuple[str, ...]:
        names = {Path(p).name for p in self.found}
        return tuple(n for n in self.needed if n not in names)


def metric_weight_dirs() -> list[Path]:
    """Where perceptual-metric weights are looked for: ``$NCPIPE_METRIC_WEIGHTS`` folders, then torch's hub cache."""
    extra = [Path(p) for p in os.environ.get(METRIC_WEIGHTS_ENV, "").split(os.pathsep) if p]
    return [*extra, Path(torch.hub.get_dir()) / "checkpoints"]


def perceptual_weights() -> list[WeightStatus]:
    """Which weight files of each perceptual metric are present in :func:`metric_weight_dirs`."""
    dirs = metric_weight_dirs()
    statuses = []
    for metric, needed in PERCEPTUAL_WEIGHT_FILES.items():
        found = [next((str(d / n) for d in dirs if (d / n).is_file()), None) for n in needed]
        statuses.append(WeightStatus(metric, needed, tuple(f for f in found if f)))
    return statuses


def perceptual_message(statuses: Sequence[WeightStatus]) -> str:
    """One paragraph for the log and the summary: what is missing, where it was looked for."""
    where = ", ".join(str(d) for d in metric_weight_dirs())
    missing = [f"{s.metric} needs {' + '.join(s.missing)}" for s in statuses if s.missing]
    complete = [s.metric for s in statuses if not s.missing]
    parts = []
    if missing:
        parts.append(f"Perceptual metrics not computed: weights missing ({'; '.join(missing)}). Looked in: {where} "
                     f"(set ${METRIC_WEIGHTS_ENV} to a folder holding these files; ncpipe downloads nothing).")
    if complete:
        parts.append(f"Weights found for {', '.join(complete)}, but this evaluation does not compute them yet: "
                     "their implementations are not checked against reference values here.")
    return " ".join(parts)
