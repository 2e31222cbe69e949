"""Pieces every ncpipe training job shares: schedules, resumable state, logging.

The training state is one file, ``train_state.pt``, or, where files must stay small (a GPU
machine hands back files of at most 16 MiB), parts ``train_state.pt.000``, ``.001``, ...
listed with their SHA-256 in ``train_state.parts.json``, which is written last: a state is
complete exactly when its index is there and every part matches it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ncpipe.io.storage import write_bytes_atomic

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
PARTS_INDEX = "train_state.parts.json"


def step_learning_rate(step: int, total_steps: int, base_lr: float, decay_at: float) -> float:
    """Constant, then one x0.1 drop for the last ``1 - decay_at`` of training."""
    return base_lr * (0.1 if step >= decay_at * total_steps else 1.0)


def save_state(run_dir: Path, state: dict[str, Any], part_mib: int | None = None) -> Path:
    """Write the training state atomically (one file, or parts of at most ``part_mib`` MiB),
    so a kill never leaves a torn state; returns the file a loader reads first."""
    run_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    old_parts = sorted(run_dir.glob(STATE_FILE + ".[0-9][0-9][0-9]"))
    if part_mib is None:
        written = _write_atomic(run_dir / STATE_FILE, data)
        for stale in [run_dir / PARTS_INDEX, *old_parts]:
            stale.unlink(missing_ok=True)
        return written
    size = part_mib << 20
    parts = [data[i : i + size] for i in range(0, len(data), size)]
    (run_dir / PARTS_INDEX).unlink(missing_ok=True)  # the old index goes first: its parts are being replaced
    for stale in old_parts[len(parts):]:
        stale.unlink()
    for number, part in enumerate(parts):
        _write_atomic(run_dir / f"{STATE_FILE}.{number:03d}", part)
    index = {"bytes": len(data), "parts": [hashlib.sha256(p).hexdigest() for p in parts]}
    written = _write_atomic(run_dir / PARTS_INDEX, json.dumps(index).encode())
    (run_dir / STATE_FILE).unlink(missing_ok=True)
    return written


def _write_atomic(path: Path, data: bytes) -> Path:
    write_bytes_atomic(str(path), data)
    return path


def load_state(run_dir: Path) -> dict[str, Any] | None:
    """The saved training state (whole or in parts), or None when ``run_dir`` holds none."""
    path, index = run_dir / STATE_FILE, run_dir / PARTS_INDEX
    newest = max((p for p in (path, index) if p.exists()), key=lambda p: p.stat().st_mtime_ns, default=None)
    if newest is None:
        return None
    if newest == path:
        return torch.load(path, map_location="cpu", weights_only=True)
    expected = json.loads(index.read_text())
    data = b""
    for number, digest in enumerate(expected["parts"]):
        part = (run_dir / f"{STATE_FILE}.{number:03d}").read_bytes()
        if hashlib.sha256(part).hexdigest() != digest:
            raise ValueError(f"{run_dir}: training state part {number} does not match {PARTS_INDEX}")
        data += part
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def has_state(run_dir: Path) -> bool:
    return (run_dir / STATE_FILE).exists() or (run_dir / PARTS_INDEX).exists()


class StopRequest:
    """Ctrl-C or SIGTERM during training asks for a stop at the end of the current step (so the saved
    state is a whole step's, never torn); a second Ctrl-C interrupts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stop requested: finishing this step and saving the state (Ctrl-C again to abort)")

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


class TrainingWindow:
    """When a training window saves its state and when it ends, for every trainer.

    It saves every ``checkpoint_every`` steps, at the last step, after ``checkpoint_minutes`` without
    a save, and before it ends; it ends at ``max_minutes`` or on Ctrl-C/SIGTERM (:class:`StopRequest`),
    so the same command resumes it. ``with TrainingWindow(...) as window:`` then, after each step,
    ``due, end = window.after(steps_done)``; call :meth:`saved` after saving and :meth:`log_end` on ending.
    """

    def __init__(self, total_steps: int, checkpoint_every: int, checkpoint_minutes: float,
                 max_minutes: float | None) -> None:
        self.total_steps = total_steps
        self.checkpoint_every = checkpoint_every
        self.checkpoint_minutes = checkpoint_minutes
        self.max_minutes = max_minutes
        self.stop = StopRequest()
        self.started = self.saved_at = time.monotonic()
        self.out_of_time = False

    def __enter__(self) -> "TrainingWindow":
        self.stop.__enter__()
        self.started = self.saved_at = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.__exit__(*exc)

    def after(self, done: int) -> tuple[bool, bool]:
        """(a save is due now, the window ends now) after ``done`` steps in all."""
        now = time.monotonic()
        self.out_of_time = self.max_minutes is not None and now - self.started >= 60 * self.max_minutes
        end = self.out_of_time or self.stop.requested
        save = (done % self.checkpoint_every == 0 or done == self.total_steps or end
                or now - self.saved_at >= 60 * self.checkpoint_minutes)
        return save, end

    def saved(self) -> None:
        self.saved_at = time.monotonic()

    def log_end(self, done: int) -> None:
        why = f"max_minutes {self.max_minutes:g} reached" if self.out_of_time else "interrupted"
        log.info("stopping at step %d of %d (%s): the state is saved; run again to resume",
                 done, self.total_steps, why)


@dataclass
class StepMeans:
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
            eta = (self.total_steps - step - 1) / rate
            log.info("step %d/%d %s (%.2f steps/s, ETA %s)", step + 1, self.total_steps, means, rate,
                     time.strftime("%H:%M:%S", time.gmtime(eta)))
            self._sums, self._count = None, 0
