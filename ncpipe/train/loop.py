"""Pieces every ncpipe training job shares: device choice, schedules, resumable state, logging."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"


def resolve_device(name: str) -> torch.device:
    """``auto`` -> the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for but CUDA is not available here")
    return device


def autocast_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """Mixed precision runs on GPUs only (bfloat16 needs no loss scaling)."""
    return torch.bfloat16 if amp and device.type == "cuda" else None


def step_learning_rate(step: int, total_steps: int, base_lr: float, decay_at: float) -> float:
    """Constant, then one x0.1 drop for the last ``1 - decay_at`` of training."""
    return base_lr * (0.1 if step >= decay_at * total_steps else 1.0)


def save_state(run_dir: Path, state: dict[str, Any]) -> Path:
    """Write the training state atomically, so a kill never leaves a torn file."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / STATE_FILE
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_state(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / STATE_FILE
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


@dataclass
class ProgressLog:
    """Logs running means of named values every ``every`` steps."""

    total_steps: int
    every: int
    _sums: dict[str, float] | None = None
    _count: int = 0
    _started: float = 0.0

    def add(self, step: int, **values: float) -> None:
        if self._sums is None:
            self._sums, self._started = {}, time.perf_counter()
        for name, value in values.items():
            self._sums[name] = self._sums.get(name, 0.0) + float(value)
        self._count += 1
        if (step + 1) % self.every == 0 or step + 1 == self.total_steps:
            rate = self._count / max(time.perf_counter() - self._started, 1e-9)
            means = " ".join(f"{k}={v / self._count:.4g}" for k, v in self._sums.items())
            log.info("step %d/%d %s (%.2f steps/s)", step + 1, self.total_steps, means, rate)
            self._sums, self._count = None, 0
