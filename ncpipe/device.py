"""Which torch device a job runs on: one rule for every command and actor."""

from __future__ import annotations

import torch

from ncpipe.errors import NcpipeError


class DeviceError(NcpipeError, ValueError):
    """A device was asked for that this machine does not have."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise DeviceError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} was asked for but CUDA is not available here: use --device cpu")
    return device


def autocast_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """Mixed precision runs on GPUs only (bfloat16 needs no loss scaling)."""
    return torch.bfloat16 if amp and device.type == "cuda" else None


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timer read next measures it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
