"""What the diffusion trainers (``train refiner``, ``train corrdiff``) share: their common options, the
learning-rate schedule, the step loop, and the resumable state (save, restore, release).

::

    restore(run_dir) or init_from ─> start ─> for step in start..steps: lr(step) ─ batch ─ loss ─ clip ─ Adam
                                                 ─ EMA update ─ log
              every checkpoint_every steps / checkpoint_minutes, at the end, at max_minutes, on Ctrl-C:
                  [release_best(EMA weights): validate, release when better] ─ save(run_dir) (atomic)

Training comes in windows, as the codec's (``ncpipe.train.codec_trainer``): ``max_minutes`` ends one
cleanly, a re-run with the same ``run_dir`` resumes it (weights, optimizer, EMA, best loss), and a new
``run_dir`` continues from released weights with ``init_from``. A run directory holds one job: its
state names the job's format and the network's identity (config and codecs), and a resume with
anything else is refused rather than mixed.
"""

from __future__ import annotations

import copy
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
from ncpipe.train.ema import EmaWeights
from ncpipe.train.loop import StepMeans, TrainingWindow, load_state, save_state, step_learning_rate

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
    ema_decay: float = 0.999  # the released weights are this EMA of the training weights (0: the raw weights)
    checkpoint_minutes: float = 10.0  # save (and release when better) at least this often
    max_minutes: float | None = None  # end this training window after this much time, saving the state
    init_from: str | None = None  # a new run starts from these released weights (or a run_dir's state)
    part_mib: int | None = None  # write the training state as parts of at most this many MiB

    def __post_init__(self) -> None:
        if self.crop % LATENT_STRIDE or self.crop < LATENT_STRIDE:
            raise ValueError(f"crop must be a positive multiple of the latent stride {LATENT_STRIDE}, got {self.crop}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.checkpoint_minutes <= 0 or any(v is not None and v <= 0 for v in (self.max_minutes, self.part_mib)):
            raise ValueError("checkpoint_minutes, max_minutes and part_mib must be positive")

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


@dataclass
class Resumed:
    """Where a run continues: its step, its weight average, and the best validation loss released so far."""

    step: int
    ema: EmaWeights | None
    best_validation: float = math.inf


def restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer, run_dir: Path,
            state_spec: RunState) -> dict[str, Any] | None:
    """Load the run's state into ``model`` and ``optimizer``; returns the state (None: a fresh run)."""
    state = load_state(run_dir)
    if state is None:
        return None
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
    return state


def resume_on(model: torch.nn.Module, optimizer: torch.optim.Optimizer, run_dir: Path, state_spec: RunState,
              device: torch.device, options: DiffusionTrainOptions,
              load_initial: Callable[[torch.nn.Module, str], None] | None = None) -> Resumed:
    """``restore`` (or, for a new run, ``load_initial(model, options.init_from)``), then the model, its
    weight average and the optimizer state on ``device``, in training mode."""
    state = restore(model, optimizer, run_dir, state_spec)
    if state is None and options.init_from:
        if load_initial is None:
            raise ValueError(f"{state_spec.label} training cannot start from init_from weights")
        load_initial(model, options.init_from)
        log.info("initialised from %s", options.init_from)
    model.to(device).train()
    for values in optimizer.state.values():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                values[key] = value.to(device)
    ema = EmaWeights(model, options.ema_decay) if options.ema_decay > 0 else None
    resumed = Resumed(0, ema)
    if state is not None:
        resumed.step = int(state["step"])
        resumed.best_validation = float(state.get("best_validation", math.inf))
        if ema is not None and "ema" in state:
            ema.load_state_dict(state["ema"], device)
    log.info("%s: %d parameters on %s from step %d", state_spec.label, sum(p.numel() for p in model.parameters()),
             device, resumed.step)
    return resumed


def save(model: torch.nn.Module, optimizer: torch.optim.Optimizer, run_dir: Path, state_spec: RunState,
         options: DiffusionTrainOptions, step: int, resumed: Resumed | None = None) -> None:
    """Write the run's state atomically (with its weight average and best validation loss)."""
    state = {
        "format": state_spec.format,
        "config": jsonable(asdict(options)),
        **state_spec.identity,
        "step": step,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
    }
    if resumed is not None:
        state["best_validation"] = resumed.best_validation
        if resumed.ema is not None:
            state["ema"] = resumed.ema.state_dict()
    log.info("saved %s at step %d", save_state(run_dir, state, options.part_mib), step)


def released_network(model: torch.nn.Module, resumed: Resumed) -> torch.nn.Module:
    """A CPU copy of what a run releases: the weight average, or the raw weights when there is none."""
    return resumed.ema.averaged(model) if resumed.ema is not None else copy.deepcopy(model).cpu()


# (released network (a CPU copy), step, best validation so far) -> the new best validation loss
ReleaseBest = Callable[[torch.nn.Module, int, float], float]


def run_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, crops, options: DiffusionTrainOptions,
              run_dir: Path, state_spec: RunState, device: torch.device, resumed: Resumed, batch_loss: BatchLoss,
              release_best: ReleaseBest | None = None) -> float:
    """Steps ``resumed.step`` to ``options.steps`` of Adam on ``batch_loss``, updating the weight average;
    returns the last batch's loss.

    A training window ends at ``options.steps``, after ``max_minutes`` or on Ctrl-C/SIGTERM, always
    with the state saved. At every save ``release_best`` may validate and release the averaged weights.
    """
    start = resumed.step
    generator = torch.Generator().manual_seed(options.seed * 1_000_003 + start)
    amp_dtype = autocast_dtype(device, options.amp)
    progress, last_loss = StepMeans(options.steps, options.log_every), math.nan
    with TrainingWindow(options.steps, options.checkpoint_every, options.checkpoint_minutes,
                        options.max_minutes) as window:
        for step in range(start, options.steps):
            last_loss = _one_step(model, optimizer, crops, options, device, step, batch_loss, generator, amp_dtype,
                                  progress)
            if resumed.ema is not None:
                resumed.ema.update(model)
            due, end = window.after(step + 1)
            if due:
                if release_best is not None:
                    resumed.best_validation = release_best(released_network(model, resumed), step + 1,
                                                           resumed.best_validation)
                save(model, optimizer, run_dir, state_spec, options, step + 1, resumed)
                window.saved()
            if end:
                window.log_end(step + 1)
                break
    return last_loss


def _one_step(model, optimizer, crops, options: DiffusionTrainOptions, device, step: int, batch_loss: BatchLoss,
              generator, amp_dtype, progress: StepMeans) -> float:
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(step, options)
    batch = tuple(t.to(device, non_blocking=True) for t in crops.batch(options.batch_size))
    loss, logged = batch_loss(batch, generator, amp_dtype)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), options.clip_grad_norm)
    optimizer.step()
    value = loss.item()  # one device synchronisation per step
    progress.add(step, loss=value, **logged)
    return value


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
