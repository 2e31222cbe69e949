"""What the diffusion trainers (``train refiner``, ``train corrdiff``) share: their common options, the
learning-rate schedule, the step loop, and the resumable state (save, restore, release).

::

    restore(run_dir) ─> start ─> for step in start..steps: lr(step) ─ batch ─ loss ─ clip ─ Adam ─ log
                                   every checkpoint_every steps: save(run_dir)   (atomic)
                          ─> release(<run_dir>/<file>.pt with provenance)

A run directory holds one job: its state names the job's format and the network's identity
(config and codecs), and a resume with anything else is refused rather than mixed.
"""

from __future__ import annotations

import logging
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ncpipe.bitstream import LATENT_STRIDE
from ncpipe.device import autocast_dtype
from ncpipe.diffusion.refiner import jsonable
from ncpipe.diffusion.unet import UNetConfig
from ncpipe.train.data import load_training_images
from ncpipe.train.loop import ProgressLog, load_state, save_state, step_learning_rate

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, ...]  # (x0, x̂, ŷ, λ) from ``AlignedCrops.batch``, on the device
# (batch, noise generator, autocast dtype) -> (loss to minimise, named values to log)
BatchLoss = Callable[[Batch, torch.Generator, "torch.dtype | None"], tuple[torch.Tensor, dict[str, float]]]


@dataclass(frozen=True, kw_only=True)
class DiffusionTrainOptions:
    """Options every diffusion trainer has: the U-Net's size, the optimisation, the run."""

    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)
    blocks_per_level: int = 1
    time_embed_dim: int = 128
    affm: bool = True
    steps: int = 20000
    batch_size: int = 8
    crop: int = 128
    lr: float = 2e-4
    warmup_steps: int = 100
    lr_decay_at: float = 0.85
    clip_grad_norm: float = 1.0
    checkpoint_every: int = 500
    log_every: int = 50
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    threads: int = 0
    max_images: int = 0  # 0 = every training image
    cache_dir: str | None = None  # the codec-decoded training set, shared by runs of the same codec

    def __post_init__(self) -> None:
        if self.crop % LATENT_STRIDE or self.crop < LATENT_STRIDE:
            raise ValueError(f"crop must be a positive multiple of the latent stride {LATENT_STRIDE}, got {self.crop}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")

    def unet_config(self) -> UNetConfig:
        """The U-Net these options describe (channels and conditioning are set by the network's config)."""
        unet = UNetConfig(
            base_channels=self.base_channels, channel_mults=tuple(self.channel_mults),
            blocks_per_level=self.blocks_per_level, time_embed_dim=self.time_embed_dim, affm=self.affm,
            norm_groups=math.gcd(8, self.base_channels),
        )
        if self.crop % unet.size_multiple:
            raise ValueError(f"crop {self.crop} must be a multiple of the U-Net's size multiple {unet.size_multiple}")
        return unet

    def training_images(self, data: Sequence[str]) -> list[np.ndarray]:
        images = load_training_images(data, self.crop)
        return images[: self.max_images] if self.max_images else images


@dataclass(frozen=True)
class RunState:
    """What a run directory's state must record to be resumed: the job's format and the network's identity."""

    format: str
    identity: dict[str, Any]  # e.g. {"corrdiff_config": ..., "codec": ...}; compared as a whole on resume
    label: str  # "refiner", "CorrDiff": for messages


def learning_rate(step: int, options: DiffusionTrainOptions) -> float:
    """Linear warm-up over ``warmup_steps``, then ``step_learning_rate`` (one x0.1 drop)."""
    warmup = min(1.0, (step + 1) / options.warmup_steps) if options.warmup_steps > 0 else 1.0
    return warmup * step_learning_rate(step, options.steps, options.lr, options.lr_decay_at)


def restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer, run_dir: Path, state_spec: RunState) -> int:
    """Load the run's state into ``model`` and ``optimizer``; returns the step to continue from (0: fresh)."""
    state = load_state(run_dir)
    if state is None:
        return 0
    if state.get("format") != state_spec.format:
        raise ValueError(f"{run_dir} holds another job's training state; use a fresh --run-dir")
    if any(state.get(key) != value for key, value in state_spec.identity.items()):
        raise ValueError(
            f"{run_dir} holds a {state_spec.label} run with another configuration or codec; "
            "resume it with the same options or use a fresh --run-dir"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    log.info("resuming %s at step %d", run_dir, state["step"])
    return int(state["step"])


def resume_on(model: torch.nn.Module, optimizer: torch.optim.Optimizer, run_dir: Path, state_spec: RunState,
              device: torch.device) -> int:
    """``restore``, then model and optimizer state on ``device``, in training mode; returns the start step."""
    start = restore(model, optimizer, run_dir, state_spec)
    model.to(device).train()
    for values in optimizer.state.values():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                values[key] = value.to(device)
    log.info("%s: %d parameters on %s from step %d", state_spec.label, sum(p.numel() for p in model.parameters()),
             device, start)
    return start


def save(model: torch.nn.Module, optimizer: torch.optim.Optimizer, run_dir: Path, state_spec: RunState,
         options: DiffusionTrainOptions, step: int) -> None:
    """Write the run's state atomically."""
    state = {
        "format": state_spec.format,
        "config": jsonable(asdict(options)),
        **state_spec.identity,
        "step": step,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
    }
    log.info("saved %s at step %d", save_state(run_dir, state), step)


def run_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, crops, options: DiffusionTrainOptions,
              run_dir: Path, state_spec: RunState, device: torch.device, start: int, batch_loss: BatchLoss) -> float:
    """Steps ``start`` to ``options.steps`` of Adam on ``batch_loss``; returns the last batch's loss."""
    generator = torch.Generator().manual_seed(options.seed * 1_000_003 + start)
    amp_dtype = autocast_dtype(device, options.amp)
    progress, last_loss = ProgressLog(options.steps, options.log_every), math.nan
    for step in range(start, options.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, options)
        batch = tuple(t.to(device, non_blocking=True) for t in crops.batch(options.batch_size))
        loss, logged = batch_loss(batch, generator, amp_dtype)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), options.clip_grad_norm)
        optimizer.step()
        last_loss = loss.item()
        progress.add(step, loss=last_loss, **logged)
        if (step + 1) % options.checkpoint_every == 0 or step + 1 == options.steps:
            save(model, optimizer, run_dir, state_spec, options, step + 1)
    return last_loss


def provenance(options: DiffusionTrainOptions, device: torch.device, images: int, last_loss: float,
               **specific: Any) -> dict[str, Any]:
    """What a released network records about its training (stored in the checkpoint, not hashed)."""
    return {
        "training": jsonable(asdict(options)),
        "steps": options.steps,
        "training_images": images,
        **specific,
        "final_batch_loss": last_loss,
        "device": str(device),
        "machine": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def release(model: torch.nn.Module, path: Path, provenance: dict[str, Any],
            save_fn: Callable[[Any, Path, dict[str, Any]], str], label: str) -> Path:
    """Save the trained network (in eval mode, on the CPU) with ``save_fn``; returns its path."""
    model.eval()
    sha256 = save_fn(model.cpu(), path, provenance)
    log.info("released %s (%s sha256 %s)", path, label, sha256)
    return path
