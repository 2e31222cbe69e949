"""Training batches for the two processes, both with the x0 target (the denoiser predicts x0).

Random draws (the step per image, the Gaussian noise) come from an optional CPU ``torch.Generator``
and are moved to the data's device, so a seeded run draws the same numbers on any device.
A loss is then e.g. ``F.mse_loss(denoiser(batch.x_t, batch.t, cond), batch.target)``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from ncpipe.diffusion.schedules import AlphaBar, bridge_forward, cosine_alpha_bar, gaussian_forward


class TrainingBatch(NamedTuple):
    x_t: Tensor  # network input, like x0
    t: Tensor  # (B,) continuous time, the network's time input
    target: Tensor  # x0


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(device=x.device, dtype=x.dtype)


def bridge_training_batch(
    x0: Tensor, x_hat: Tensor, etas: Tensor, generator: torch.Generator | None = None, kappa: float = 0.0
) -> TrainingBatch:
    """One step k ~ U{1..T} per image; x_t = x0 + η_k(x̂ − x0) [+ κ sqrt(η_k) ε]; t = η_k (ResShift training).

    k = 0 is never drawn: there x_t = x0 and the sampler never queries the network.
    """
    steps = torch.randint(1, len(etas), (x0.shape[0],), generator=generator)
    return bridge_batch_at(x0, x_hat, etas.cpu()[steps], generator, kappa)


def continuous_bridge_training_batch(
    x0: Tensor, x_hat: Tensor, eta_of: Callable[[Tensor], Tensor], generator: torch.Generator | None = None,
    kappa: float = 0.0,
) -> TrainingBatch:
    """A level η = eta_of(u), u ~ U[0, 1] per image (e.g. ``schedules.continuous_eta``): every K in distribution.

    η = 0 (u = 0 of a linear schedule) has probability zero; the loss there would be zero anyway.
    """
    u = torch.rand((x0.shape[0],), generator=generator, dtype=torch.float64)
    return bridge_batch_at(x0, x_hat, eta_of(u), generator, kappa)


def bridge_batch_at(
    x0: Tensor, x_hat: Tensor, eta: Tensor, generator: torch.Generator | None = None, kappa: float = 0.0
) -> TrainingBatch:
    """The bridge batch at given levels η (B,): x_t = x0 + η(x̂ − x0) [+ κ sqrt(η) ε], t = η."""
    t = eta.to(device=x0.device, dtype=x0.dtype)
    noise = _randn_like(x0, generator) if kappa > 0.0 else None
    return TrainingBatch(bridge_forward(x0, x_hat, t, noise, kappa), t, x0)


def gaussian_training_batch(
    x0: Tensor, generator: torch.Generator | None = None, alpha_bar: AlphaBar = cosine_alpha_bar
) -> TrainingBatch:
    """t ~ U[0, 1) per image; x_t = sqrt(ᾱ(t))·x0 + sqrt(1 − ᾱ(t))·ε (DDPM with continuous t, x0 target as CDC)."""
    t = torch.rand((x0.shape[0],), generator=generator).to(device=x0.device, dtype=x0.dtype)
    noise = _randn_like(x0, generator)
    return TrainingBatch(gaussian_forward(x0, t, noise, alpha_bar), t, x0)
