"""Learned-codec architectures ncpipe can code with, as adapters over CompressAI models.

An adapter exposes one hyperprior model as four pieces, so the rest of ncpipe never
reaches into a CompressAI class::

    x ──g_a──► y ──h_a──► z ──Q(median)──► ẑ ──h_s──► (scales, means) ──► ŷ ──g_s──► x̂

A *variable-rate* model adds a :class:`QualitySteps` table: for each quality level ``q`` a
quantization step per latent channel, ``Δ_q``. The encoder codes ``round((y − μ)/Δ_q)`` with
the Gaussian of scale ``σ/Δ_q``, the decoder forms ``ŷ = Δ_q · symbol + μ``; one set of
transforms then serves every rate (quantization-step gains, as in Kamisli et al., DCC 2024,
and CompressAI's ``vbr`` models). Training draws a level per sample and weights its
distortion by that level's λ.

``hyper_synthesis_layers`` is the part that turns ẑ into entropy parameters. It is the
only part whose output must agree bit for bit between encoder and decoder, so ncpipe
runs it in fixed-point integer arithmetic (:mod:`ncpipe.entropy.integer_net`) instead of
calling it as a float module.

To add an architecture: name its CompressAI ``CompressionModel`` class (in
``compressai.models``) and write an adapter that names its pieces; register both in ``ARCHITECTURES``. Models with a
spatial or channel context (``Cheng2020AnchorCheckerboard``, ``Elic2022Chandelier``)
add coding *stages*: each stage's entropy parameters are a deterministic function of ẑ
and of the ŷ decoded in earlier stages; see ``docs/architecture.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from ncpipe.models.tiling import synthesise

if TYPE_CHECKING:
    from compressai.models.base import CompressionModel


@dataclass(frozen=True)
class ArchitectureSpec:
    """How to build one architecture and which of its outputs exist."""

    name: str
    model_class: str  # a class of compressai.models
    default_hparams: dict[str, int] = field(default_factory=dict)
    has_means: bool = True

    @property
    def builder(self) -> type[CompressionModel]:
        # imported on first use: compressai's import (its point-cloud registry pulls in torch_geometric)
        # takes seconds, which a job's driver, which never builds a model, should not pay
        import compressai.models

        return getattr(compressai.models, self.model_class)

    def build(self, **hparams: int) -> CompressionModel:
        unknown = set(hparams) - set(self.default_hparams)
        if unknown:
            raise ValueError(
                f"architecture {self.name!r} takes {sorted(self.default_hparams)}, "
                f"not {sorted(unknown)}"
            )
        return self.builder(**{**self.default_hparams, **hparams})


ARCHITECTURES: dict[str, ArchitectureSpec] = {
    spec.name: spec
    for spec in (
        ArchitectureSpec("mbt2018-mean", "MeanScaleHyperprior", {"N": 128, "M": 192}, True),
        ArchitectureSpec("bmshj2018-hyperprior", "ScaleHyperprior", {"N": 128, "M": 192}, False),
    )
}


def architecture(name: str) -> ArchitectureSpec:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(
            f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}"
        ) from None


class QualitySteps(nn.Module):
    """Learned per-level, per-channel quantization steps ``Δ_q = exp(log_steps[q])``.

    Levels are ordered by λ (quality 1 = the smallest λ = the fewest bits). The steps start at
    ``sqrt(λ_ref / λ_q)``, the high-rate optimum when the transforms were trained at ``λ_ref``.
    """

    def __init__(self, lambdas: tuple[float, ...], channels: int, reference_lambda: float | None = None):
        super().__init__()
        if len(lambdas) < 2 or any(b <= a for a, b in zip(lambdas, lambdas[1:])):
            raise ValueError(f"a variable-rate model needs >= 2 increasing λ levels, got {lambdas}")
        values = torch.tensor(lambdas, dtype=torch.float64)
        reference = float(reference_lambda) if reference_lambda else float(values.log().mean().exp())
        self.register_buffer("lambdas", values.float())
        start = (0.5 * (reference / values).log()).float()
        self.log_steps = nn.Parameter(start[:, None].repeat(1, channels))

    @property
    def levels(self) -> int:
        return self.lambdas.numel()

    def steps(self, levels: torch.Tensor) -> torch.Tensor:
        """Level indexes (B,) in 0..levels-1 -> Δ (B, C, 1, 1)."""
        return self.log_steps[levels].exp()[:, :, None, None]


@dataclass(frozen=True)
class TrainOutputs:
    """What one rate-distortion training step needs from the model."""

    x_hat: torch.Tensor
    y_likelihoods: torch.Tensor
    z_likelihoods: torch.Tensor


class HyperpriorAdapter:
    """Names the pieces of a (mean-)scale hyperprior CompressAI model."""

    def __init__(self, spec: ArchitectureSpec, model: CompressionModel, quality: QualitySteps | None = None):
        self.spec = spec
        self.model = model
        self.quality = quality
        self.channels_last = False

    def set_channels_last(self, enabled: bool) -> None:
        """Run g_a and g_s on channels-last tensors (or back on contiguous ones).

        On a CPU, oneDNN's convolutions are faster on channels-last tensors than on the default
        layout; the values are the same sums in another order (float rounding only). h_s is not
        affected: the entropy path runs in exact fixed point."""
        self.channels_last = enabled
        layout = torch.channels_last if enabled else torch.contiguous_format
        self.model.g_a.to(memory_format=layout)
        self.model.g_s.to(memory_format=layout)

    def _transform(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not self.channels_last:
            return module(x)
        # back to the default layout: the callers hand the result to numpy and to fixed-point code
        return module(x.contiguous(memory_format=torch.channels_last)).contiguous()

    def modules(self) -> nn.ModuleList:
        """Everything that trains: the CompressAI model and, for a variable-rate model, its steps."""
        return nn.ModuleList([self.model] + ([self.quality] if self.quality is not None else []))

    @property
    def latent_channels(self) -> int:
        return self.model.g_a[-1].out_channels

    @property
    def hyper_channels(self) -> int:
        return self.model.entropy_bottleneck.channels

    def analysis(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x in [0, 1] -> (y, z)."""
        y = self._transform(self.model.g_a, x)
        hyper_input = y if self.spec.has_means else torch.abs(y)
        return y, self.model.h_a(hyper_input)

    def synthesis(self, y_hat: torch.Tensor) -> torch.Tensor:
        """ŷ -> x̂ (not clamped); outside autograd, a latent beyond a megapixel's runs in tiles, so memory
        is bounded by the tile (see tiling.py)."""
        g_s = lambda latent: self._transform(self.model.g_s, latent)  # noqa: E731
        if torch.is_grad_enabled():
            return g_s(y_hat)
        return synthesise(g_s, y_hat)

    def hyper_synthesis_layers(self) -> nn.Sequential:
        return self.model.h_s

    def split_entropy_parameters(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h_s output -> (scales, means); scale-only models get zero means."""
        if self.spec.has_means:
            scales, means = params.chunk(2, 1)
            return scales, means
        return params, torch.zeros_like(params)

    def forward_train(self, x: torch.Tensor, autocast_dtype: torch.dtype | None,
                      levels: torch.Tensor | None = None) -> TrainOutputs:
        """Noise-proxy forward pass; the transforms may run in reduced precision,
        the entropy models always run in float32 (their likelihoods need it).
        ``levels`` (B,): each sample's quality level, for a variable-rate model."""
        with _autocast(x.device, autocast_dtype):
            y = self.model.g_a(x)
        y = y.float()
        hyper_input = y if self.spec.has_means else torch.abs(y)
        z = self.model.h_a(hyper_input)
        z_hat, z_likelihoods = self.model.entropy_bottleneck(z)
        scales, means = self.split_entropy_parameters(self.model.h_s(z_hat))
        if self.quality is None:
            y_hat, y_likelihoods = self.model.gaussian_conditional(
                y, scales, means=means if self.spec.has_means else None
            )
        else:
            steps = self.quality.steps(levels)
            y_scaled, y_likelihoods = self.model.gaussian_conditional((y - means) / steps, scales / steps)
            y_hat = y_scaled * steps + means
        with _autocast(x.device, autocast_dtype):
            x_hat = self.model.g_s(y_hat)
        return TrainOutputs(x_hat.float(), y_likelihoods, z_likelihoods)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)


def build_adapter(arch: str, hparams: dict[str, int] | None = None, lambdas: tuple[float, ...] = (),
                  reference_lambda: float | None = None) -> HyperpriorAdapter:
    """A fresh model; with two or more ``lambdas``, a variable-rate one with a level per λ."""
    spec = architecture(arch)
    model = spec.build(**(hparams or {}))
    adapter = HyperpriorAdapter(spec, model)
    if len(lambdas) > 1:
        adapter.quality = QualitySteps(tuple(lambdas), adapter.latent_channels, reference_lambda)
    return adapter
