"""Noise schedules and one-step update rules, as pure functions returning tensors.

Two processes share one denoiser interface ``denoise(x_t, t) -> x0_hat`` (see ``samplers.py``):

* **Residual-shifting bridge** (NC-Diffusion; the ResShift / InDI family) between the original x0
  and the codec's reconstruction x̂::

      x_t = x0 + η_t · (x̂ − x0) + κ · sqrt(η_t) · ε,    η_0 = 0 < η_1 < … < η_T = 1

  The network's time input is **t = η_t** (not k/T): the time input then measures the physical
  degradation level, so a network trained on one schedule can be sampled with any other schedule
  or step count without remapping.
* **Gaussian start** (CDC-style baseline, CorrDiff): variance-preserving
  ``x_t = sqrt(ᾱ(t))·x0 + sqrt(1 − ᾱ(t))·ε`` with the cosine ᾱ and continuous t ∈ [0, 1].

All images here are in the model range [-1, 1] (see ``unet.to_model_range``).
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
from torch import Tensor

EtaKind = Literal["geometric", "linear", "polynomial"]
AlphaBar = Callable[[Tensor], Tensor]


def eta_schedule(
    num_steps: int, kind: EtaKind = "geometric", eta_min: float = 0.02, power: float = 1.0
) -> Tensor:
    """η_0 = 0 < η_1 < … < η_T = 1 as a float64 tensor of length ``num_steps + 1``.

    * ``geometric``: η_k = η_min^(1 − ((k−1)/(T−1))^power) for k ≥ 1, so η_1 = η_min and
      η_T = 1; power = 1 is a plain geometric sequence. This is the idea of ResShift's
      "exponential" schedule (Yue et al. 2023, eq. 10), which uses power 0.3 on sqrt(η) to spend
      more steps at large η. A small η_1 lets the last step make only a fine correction.
    * ``linear``: η_k = k / T (InDI, Delbracio & Milanfar 2023).
    * ``polynomial``: η_k = (k / T)^power.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if power <= 0:
        raise ValueError(f"power must be > 0, got {power}")
    k = torch.arange(num_steps + 1, dtype=torch.float64)
    if kind == "linear":
        return k / num_steps
    if kind == "polynomial":
        return (k / num_steps) ** power
    if kind != "geometric":
        raise ValueError(f"unknown eta schedule kind {kind!r}; use geometric, linear or polynomial")
    if not 0.0 < eta_min < 1.0:
        raise ValueError(f"eta_min must be in (0, 1), got {eta_min}")
    if num_steps == 1:
        return k  # [0, 1]: one step straight from x̂ to the estimate
    frac = ((k[1:] - 1) / (num_steps - 1)) ** power
    return torch.cat([k[:1], eta_min ** (1.0 - frac)])


def continuous_eta(
    u: Tensor, kind: EtaKind = "geometric", eta_min: float = 0.02, power: float = 1.0
) -> Tensor:
    """η at a continuous position u ∈ [0, 1] of the schedule family (float64, u's shape).

    Its range holds every level any K-step sampler of that family queries: ``geometric``
    η_min^(1 − u^power) ∈ [η_min, 1] (η_1 = η_min for every K >= 2, η_K = 1), ``linear`` u,
    ``polynomial`` u^power. Training on u ~ U[0, 1] therefore puts every K in distribution, where
    training on the T-step levels alone leaves the levels of any other K unseen.
    """
    u = torch.as_tensor(u, dtype=torch.float64)
    if kind == "linear":
        return u.clone()
    if kind == "polynomial":
        return u**power
    if kind != "geometric":
        raise ValueError(f"unknown eta schedule kind {kind!r}; use geometric, linear or polynomial")
    return torch.as_tensor(eta_min, dtype=torch.float64) ** (1.0 - u**power)


def _per_sample(values: Tensor | float, like: Tensor) -> Tensor:
    """A scalar or (B,) tensor -> (B, 1, 1, …) broadcastable against ``like`` (B, …)."""
    v = torch.as_tensor(values, dtype=like.dtype, device=like.device)
    if v.ndim == 0:
        v = v.expand(like.shape[0])
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def bridge_forward(
    x0: Tensor, x_hat: Tensor, eta: Tensor | float, noise: Tensor | None = None, kappa: float = 0.0
) -> Tensor:
    """x_t = x0 + η·(x̂ − x0) + κ·sqrt(η)·ε, with η a scalar or one value per sample (ResShift eq. 3)."""
    e = _per_sample(eta, x0)
    x_t = x0 + e * (x_hat - x0)
    if kappa > 0.0:
        if noise is None:
            raise ValueError("kappa > 0 needs the Gaussian noise ε passed in (noise is never drawn here)")
        x_t = x_t + kappa * e.sqrt() * noise
    return x_t


def bridge_step(
    x_t: Tensor, x0_hat: Tensor, x_hat: Tensor, eta_t: Tensor | float, eta_prev: Tensor | float,
    kappa: float = 0.0,
) -> Tensor:
    """Deterministic bridge update x_t -> x_{t-1} given the estimate x0_hat (DDIM-style, σ = 0).

    Splits x_t − x0_hat into the residual part η_t·(x̂ − x0_hat) and the rest n, and rescales each to
    its size at η_{t-1}: the residual by η_{t-1}/η_t and n by (η_{t-1}/η_t)^p, where p = 1 when
    κ = 0 and p = 1/2 when κ > 0 (n is then mostly Gaussian noise of std κ·sqrt(η)). For κ = 0 this
    is exactly ``x0_hat + η_{t-1}·(x_t − x0_hat)/η_t`` (the NC-Diffusion update).
    """
    et, ep = _per_sample(eta_t, x_t), _per_sample(eta_prev, x_t)
    ratio = ep / et
    if kappa == 0.0:
        return x0_hat + ratio * (x_t - x0_hat)
    drift = x_hat - x0_hat
    rest = x_t - x0_hat - et * drift
    return x0_hat + ep * drift + ratio.sqrt() * rest


def cosine_alpha_bar(t: Tensor, s: float = 0.008) -> Tensor:
    """ᾱ(t) = cos²((t+s)/(1+s)·π/2) / cos²(s/(1+s)·π/2), t ∈ [0, 1] (Nichol & Dhariwal 2021, eq. 17).

    ᾱ(0) = 1 exactly and ᾱ(1) ≈ 0 (clamped at 0), so t = 1 is pure noise.
    """
    t = torch.as_tensor(t, dtype=torch.float64)  # float64: ᾱ(0) must come out as exactly 1

    def f(u: Tensor) -> Tensor:
        return torch.cos((u + s) / (1 + s) * (math.pi / 2)) ** 2

    return (f(t) / f(torch.zeros_like(t))).clamp(0.0, 1.0)


def ddim_timesteps(num_steps: int) -> Tensor:
    """``num_steps + 1`` continuous times from 1 (pure noise) down to 0, evenly spaced in t."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)


def gaussian_forward(x0: Tensor, t: Tensor, noise: Tensor, alpha_bar: AlphaBar = cosine_alpha_bar) -> Tensor:
    """x_t = sqrt(ᾱ(t))·x0 + sqrt(1 − ᾱ(t))·ε, t one value per sample (Ho et al. 2020, eq. 4)."""
    ab = _per_sample(alpha_bar(t), x0)
    return ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise


def ddim_step(x_t: Tensor, x0_hat: Tensor, alpha_bar_t: Tensor | float, alpha_bar_prev: Tensor | float) -> Tensor:
    """x_t -> x_s with η_DDIM = 0, from an x0 estimate (Song et al. 2021, eq. 12).

    ε̂ = (x_t − sqrt(ᾱ_t)·x0_hat) / sqrt(1 − ᾱ_t);  x_s = sqrt(ᾱ_s)·x0_hat + sqrt(1 − ᾱ_s)·ε̂.
    With ᾱ_s = 1 the result is x0_hat exactly.
    """
    ab_t, ab_s = _per_sample(alpha_bar_t, x_t), _per_sample(alpha_bar_prev, x_t)
    eps_hat = (x_t - ab_t.sqrt() * x0_hat) / (1.0 - ab_t).clamp_min(1e-12).sqrt()
    return ab_s.sqrt() * x0_hat + (1.0 - ab_s).sqrt() * eps_hat
