"""Deterministic samplers with one signature, and per-sample seeded noise.

Every sampler takes a denoiser ``denoise(x_t, t) -> x0_hat`` (t: (B,) continuous time; a closure
such as ``unet.Denoiser.bind`` holds the conditioning, so samplers never see the network), a start
tensor, a schedule, and two optional hooks:

* ``guidance(x0_hat, step_index) -> x0_hat``: may replace the estimate before it is used; zero-shot
  consistency guidance and CorrDiff's transmitted correction x0 + λ_i·(x̂ − x0) plug in here.
  ``step_index`` counts sampler steps from 0 (the noisiest) to K − 1.
* ``callback(SamplerStep)``: observes each step (after guidance); its return value is ignored.

Samplers neither draw noise nor switch autograd: call them under ``torch.no_grad()``; a guidance
hook that needs gradients opens ``torch.enable_grad()`` on ``x0_hat.detach().requires_grad_()``.

::

    x̂ ──> x_T = x̂ ──┬─> denoise ─> x0_hat ─> guidance ─┬─> bridge_step ─> x_{t-1} ──> … ─> x_0
                    └─────────────────(x_t)────────────┘
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from ncpipe.diffusion.schedules import AlphaBar, bridge_step, cosine_alpha_bar, ddim_step

Denoise = Callable[[Tensor, Tensor], Tensor]
Guidance = Callable[[Tensor, int], Tensor]


@dataclass(frozen=True)
class SamplerStep:
    """What a callback sees at one step: the state going in and the estimate used."""

    index: int
    t: Tensor  # (B,) time given to the denoiser
    x_t: Tensor
    x0_hat: Tensor  # after guidance
    x_next: Tensor


Callback = Callable[[SamplerStep], object]


def _time(value: Tensor, like: Tensor) -> Tensor:
    return value.to(device=like.device, dtype=like.dtype).expand(like.shape[0])


def sample_bridge(
    denoise: Denoise, x_hat: Tensor, etas: Tensor, *, kappa: float = 0.0,
    guidance: Guidance | None = None, callback: Callback | None = None,
) -> Tensor:
    """Few-step deterministic residual-shifting sampler from x_T = x̂ (NC-Diffusion; ResShift with σ = 0).

    ``etas`` is η_0 = 0 < … < η_K = 1 (``eta_schedule``); the denoiser gets t = η_k. ``kappa`` must
    match training (it selects how ``bridge_step`` rescales the non-residual part).
    """
    if etas.ndim != 1 or len(etas) < 2 or float(etas[0]) != 0.0 or float(etas[-1]) != 1.0:
        raise ValueError("etas must be 1-D, start at η_0 = 0 and end at η_T = 1 (the start x_T is x̂ itself)")
    x = x_hat
    for i, k in enumerate(range(len(etas) - 1, 0, -1)):
        t = _time(etas[k], x)
        x0_hat = denoise(x, t)
        if guidance is not None:
            x0_hat = guidance(x0_hat, i)
        x_next = bridge_step(x, x0_hat, x_hat, t, _time(etas[k - 1], x), kappa)
        if callback is not None:
            callback(SamplerStep(i, t, x, x0_hat, x_next))
        x = x_next
    return x


def sample_ddim(
    denoise: Denoise, noise: Tensor, timesteps: Tensor, *, alpha_bar: AlphaBar = cosine_alpha_bar,
    guidance: Guidance | None = None, callback: Callback | None = None,
) -> Tensor:
    """Deterministic DDIM from injected Gaussian noise x_T (Song et al. 2021, eq. 12, η = 0).

    ``timesteps`` decreases from 1 to 0 (``ddim_timesteps``); the denoiser gets t, the schedule
    ᾱ(t). ``noise`` is the start x_T, drawn by the caller (e.g. ``seeded_noise``) and scaled as
    the caller wishes, so the output never depends on batch composition.
    """
    if timesteps.ndim != 1 or len(timesteps) < 2 or float(timesteps[-1]) != 0.0:
        raise ValueError("timesteps must be 1-D, decreasing, and end at t = 0")
    x = noise
    for i in range(len(timesteps) - 1):
        t, s = _time(timesteps[i], x), _time(timesteps[i + 1], x)
        x0_hat = denoise(x, t)
        if guidance is not None:
            x0_hat = guidance(x0_hat, i)
        x_next = ddim_step(x, x0_hat, alpha_bar(t), alpha_bar(s))
        if callback is not None:
            callback(SamplerStep(i, t, x, x0_hat, x_next))
        x = x_next
    return x


def generator_seed(key: str) -> int:
    """A 63-bit seed from SHA-256 of the key: stable across runs, machines and Python versions."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little") >> 1


def seeded_noise(
    keys: Sequence[str], shape: Sequence[int], device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """(len(keys), *shape) standard normal noise, row i drawn from a CPU generator seeded by keys[i].

    Drawing on the CPU makes a sample's noise independent of batch size, order and device.
    """
    rows = []
    for key in keys:
        gen = torch.Generator(device="cpu").manual_seed(generator_seed(key))
        rows.append(torch.randn(tuple(shape), generator=gen, dtype=torch.float32))
    if not rows:
        return torch.empty((0, *shape), device=device, dtype=dtype)
    return torch.stack(rows).to(device=device, dtype=dtype)
