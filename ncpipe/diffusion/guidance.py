"""Zero-shot sample-guided enhancement: pull each x0 estimate toward what the bitstream proves.

A ``guidance(x0_hat, step) -> x0_hat`` hook for ``sample_bridge`` / ``sample_ddim`` (no training).
Two corrections, each switchable by its weight in :class:`GuidanceConfig`:

**(a) Latent (quantization-bin) consistency.** The encoder wrote y_sym = round((y − μ) / Δ), so the
original's latent y = g_a(x) lay in the bin [ŷ − Δ/2, ŷ + Δ/2] around ŷ = Δ·y_sym + μ (μ: the decoded
means; Δ: the quantization step of the image's quality level, per latent channel, for a
variable-rate codec, and Δ = 1 for a fixed-rate one). Re-encode the estimate and measure how far it
leaves its bins::

    x0 (B,3,Hc,Wc) [-1,1] ─> [0,1] ─crop to (h,w), replicate-pad to (Hp,Wp)─> g_a ─> y0 (B,M,Hp/16,Wp/16)
    v = relu(|y0 − ŷ| − Δ/2)          (zero inside the bin: the dead zone of the constraint)
    E_i = ½ Σ v²  per image i         (``violation_energy``)
    x0_i ← x0_i − S · E_i / ‖∇E_i‖² · ∇E_i

The step is a Polyak step (a gradient step whose length removes the fraction S of E to first order),
so S ∈ (0, 1] is dimensionless: independent of image size, of g_a's gain and of how large the
violation is, and an estimate already inside every bin is left unchanged. Compare DPS (Chung et al.
2023, Algorithm 1), which steps along ∇‖y − A(x0)‖ with a hand-tuned ζ, and DDNM (Wang et al. 2023),
which projects with a pseudo-inverse; g_a has neither a cheap pseudo-inverse nor a known gain.
The crop + replicate padding reproduces ``ncpipe.codec.stack_padded``, so g_a sees what the encoder saw.

**(b) Low-frequency consistency with x̂.** The codec keeps coarse structure well; a DDNM-style
range-space step with A = average pooling over ``low_pass`` x ``low_pass`` blocks and A† ≈ bilinear
upsampling removes the fraction w of the low-pass difference::

    x0 ← x0 − w · up(avgpool(x0 − x̂))

Cost: (a) runs g_a forward and backward once per sampler step (plus h_a forward, which
``HyperpriorAdapter.analysis`` includes); (b) is a pooling. Every per-image quantity (E_i, the step
length) is computed per image, so a batch gives each image what it would get alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

Analysis = Callable[[Tensor], Tensor]  # x in [0, 1], (B, 3, Hp, Wp) -> y (B, M, Hp/16, Wp/16)


@dataclass(frozen=True)
class GuidanceConfig:
    """Zero-shot guidance options; ``None`` (or both weights 0) switches guidance off.

    ``strength`` S: fraction of the bin-violation energy removed per step, to first order (a).
    ``low_frequency`` w: fraction of the ``low_pass``-block mean difference to x̂ removed per step (b).
    ``first_step``: guide sampler steps with index >= this (0 = every step; index 0 is the noisiest).
    """

    strength: float = 0.5
    low_frequency: float = 0.0
    low_pass: int = 16
    first_step: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.strength <= 2.0:
            raise ValueError(f"guidance strength must be in [0, 2] (1 = remove all of the first-order violation), "
                             f"got {self.strength}")
        if not 0.0 <= self.low_frequency <= 1.0:
            raise ValueError(f"low_frequency weight must be in [0, 1], got {self.low_frequency}")
        if self.low_pass < 1 or self.first_step < 0:
            raise ValueError("low_pass must be >= 1 and first_step >= 0")

    @property
    def enabled(self) -> bool:
        return self.strength > 0.0 or self.low_frequency > 0.0


def encoder_input(x01: Tensor, sizes: Sequence[tuple[int, int]], padded: tuple[int, int]) -> Tensor:
    """Crop image i to sizes[i] and replicate its last row/column up to ``padded`` (differentiable).

    The same padding as the encoder's ``stack_padded``, so g_a of the result is comparable to ŷ.
    """
    hp, wp = padded
    rows = []
    for i, (h, w) in enumerate(sizes):
        if h > hp or w > wp or h > x01.shape[-2] or w > x01.shape[-1]:
            raise ValueError(f"image size {(h, w)} does not fit the canvas {tuple(x01.shape[-2:])} / padded {padded}")
        rows.append(F.pad(x01[i : i + 1, :, :h, :w], (0, wp - w, 0, hp - h), mode="replicate"))
    return torch.cat(rows)


def bin_violation(y: Tensor, y_hat: Tensor, step: Tensor | float = 1.0) -> Tensor:
    """relu(|y − ŷ| − Δ/2) per element: how far each latent lies outside its quantization bin.

    ``step`` Δ: a scalar or a tensor broadcastable to y, e.g. (B, M, 1, 1) per image and channel.
    """
    return ((y - y_hat).abs() - 0.5 * step).clamp_min(0.0)


def violation_energy(
    analysis: Analysis, x0_model: Tensor, y_hat: Tensor, sizes: Sequence[tuple[int, int]], padded: tuple[int, int],
    step: Tensor | float = 1.0,
) -> Tensor:
    """E_i = ½ Σ relu(|g_a(x0_i) − ŷ_i| − Δ/2)², shape (B,); x0 in the model range [-1, 1]."""
    y = analysis(encoder_input((x0_model + 1.0) * 0.5, sizes, padded))
    if y.shape != y_hat.shape:
        raise ValueError(f"g_a gives latents {tuple(y.shape)} but ŷ is {tuple(y_hat.shape)}: wrong codec or canvas")
    return 0.5 * bin_violation(y.float(), y_hat, step).square().sum(dim=(1, 2, 3))


def latent_consistency_step(
    analysis: Analysis, x0_model: Tensor, y_hat: Tensor, sizes: Sequence[tuple[int, int]],
    padded: tuple[int, int], strength: float, step: Tensor | float = 1.0,
) -> tuple[Tensor, Tensor]:
    """One Polyak step on E (see module docstring) -> (new x0, E before the step (B,))."""
    with torch.inference_mode(False), torch.enable_grad():
        x = x0_model.detach().clone().requires_grad_(True)
        energy = violation_energy(analysis, x, y_hat, sizes, padded, step)
        (grad,) = torch.autograd.grad(energy.sum(), x)
    energy, grad = energy.detach(), grad.detach()
    grad_sq = grad.square().sum(dim=(1, 2, 3))
    length = torch.where(grad_sq > 0, strength * energy / grad_sq.clamp_min(1e-30), torch.zeros_like(energy))
    return x0_model - length.view(-1, 1, 1, 1).to(grad.dtype) * grad, energy


def low_frequency_step(x0_model: Tensor, x_hat_model: Tensor, weight: float, low_pass: int) -> Tensor:
    """x0 − w · up(avgpool(x0 − x̂)): pull the ``low_pass``-block means toward x̂'s."""
    diff = F.avg_pool2d(x0_model - x_hat_model, low_pass, ceil_mode=True)
    up = F.interpolate(diff, scale_factor=float(low_pass), mode="bilinear", align_corners=False)
    return x0_model - weight * up[..., : x0_model.shape[-2], : x0_model.shape[-1]]


@dataclass
class SampleGuidance:
    """The hook ``guidance(x0_hat, step) -> x0_hat``; ``energies`` records E (B,) before each latent step."""

    config: GuidanceConfig
    analysis: Analysis | None
    y_hat: Tensor | None  # (B, M, hy, wy) ŷ = y_sym + μ
    x_hat_model: Tensor  # (B, 3, Hc, Wc) x̂ in [-1, 1] on the sampling canvas
    sizes: tuple[tuple[int, int], ...]
    padded: tuple[int, int]  # the codec's padded image size (Hp, Wp)
    bin_steps: Tensor | float = 1.0  # Δ per image and latent channel (B, M, 1, 1); 1 for a fixed-rate codec
    energies: list[tuple[int, Tensor]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.config.strength > 0.0 and (self.analysis is None or self.y_hat is None):
            raise ValueError("latent-consistency guidance re-encodes with the codec's g_a: pass the codec and ŷ")

    def __call__(self, x0_hat: Tensor, step: int) -> Tensor:
        if step < self.config.first_step:
            return x0_hat
        if self.config.low_frequency > 0.0:
            x0_hat = low_frequency_step(x0_hat, self.x_hat_model, self.config.low_frequency, self.config.low_pass)
        if self.config.strength > 0.0:
            x0_hat, energy = latent_consistency_step(
                self.analysis, x0_hat, self.y_hat, self.sizes, self.padded, self.config.strength,  # type: ignore[arg-type]
                self.bin_steps,
            )
            self.energies.append((step, energy))
        return x0_hat
