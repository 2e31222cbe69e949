"""Deterministic hyper-synthesis: h_s evaluated in fixed-point integer arithmetic.

The entropy coder needs, for every latent element, a probability table index (from the
predicted scale) and a mean. Encoder and decoder must compute them *bit-identically*:
one scale falling on the other side of a table boundary desynchronises the rANS stream
(CompressAI issue #279; our own probe: GPU-encoded bitstreams failing on CPU). Float
convolutions differ across devices, libraries, batch sizes and thread counts, so ncpipe
never uses them on this path (integer networks: Ballé, Johnston & Minnen, ICLR 2019).

Scheme. Activations are integers ``a = round(v · 2^A)`` with ``A = ACT_FRAC_BITS``,
clamped to ``±ACT_LIMIT``; layer ``l``'s weights are ``w_int = round(w · 2^W_l)`` and
its bias ``b_int = round(b · 2^(W_l + A))``. A convolution is then

    acc = Σ w_int · a + b_int            (integers, exact)
    a'  = floor(acc · 2^-W_l + 1/2)      (back to A fraction bits, exact)

The integers are held in float64 tensors and convolved as im2col/col2im plus float64
matrix products: as long as every partial sum stays below 2^53 in magnitude, float64
arithmetic on integers is exact in any summation order, on any device. ``W_l`` is chosen per layer
(at release time, then stored) so that the worst case ``Σ|w_int| · ACT_LIMIT + |b_int|``
stays below ``EXACT_LIMIT``; loading re-checks it. LeakyReLU uses a slope of
``round(slope · 2^16) / 2^16``, also exact.

The integer weights are derived from the checkpoint's float weights by the rounding
above, which is exact IEEE arithmetic and so the same everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ncpipe.errors import NcpipeError

ACT_FRAC_BITS = 12
ACT_LIMIT = 1 << (14 + ACT_FRAC_BITS)  # |activation| <= 16384 in real units
EXACT_LIMIT = 1 << 52  # one bit of headroom below float64's 2^53 integer range
MAX_WEIGHT_FRAC_BITS = 16
_SLOPE_BITS = 16


class IntegerNetError(NcpipeError, ValueError):
    """The layers cannot be run exactly in fixed point (unsupported layer or range)."""


@dataclass(frozen=True)
class _FixedConv:
    transposed: bool
    weight: torch.Tensor  # float64, integer-valued
    bias: torch.Tensor  # float64, integer-valued, shape (C_out,)
    frac_bits: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    output_padding: tuple[int, int]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        acc = self._transposed(x) if self.transposed else self._direct(x)
        # in place on the fresh accumulator: the same IEEE operations in the same order, without a
        # temporary per operation
        acc.add_(self.bias.view(1, -1, 1, 1)).mul_(2.0**-self.frac_bits).add_(0.5).floor_()
        return acc.clamp_(-ACT_LIMIT, ACT_LIMIT)

    # Convolutions as explicit im2col/col2im + matrix products: only sums of exact
    # integer products, whatever library or device runs them (cuDNN, which may pick
    # FFT or Winograd kernels, is never involved, and no global flag is touched).

    def _direct(self, x: torch.Tensor) -> torch.Tensor:
        c_out, _, kh, kw = self.weight.shape
        h_out = (x.shape[2] + 2 * self.padding[0] - kh) // self.stride[0] + 1
        w_out = (x.shape[3] + 2 * self.padding[1] - kw) // self.stride[1] + 1
        columns = F.unfold(x, (kh, kw), padding=self.padding, stride=self.stride)
        return (self.weight.reshape(c_out, -1) @ columns).view(x.shape[0], c_out, h_out, w_out)

    def _transposed(self, x: torch.Tensor) -> torch.Tensor:
        c_in, c_out, kh, kw = self.weight.shape
        h_out = (x.shape[2] - 1) * self.stride[0] - 2 * self.padding[0] + kh + self.output_padding[0]
        w_out = (x.shape[3] - 1) * self.stride[1] - 2 * self.padding[1] + kw + self.output_padding[1]
        columns = self.weight.reshape(c_in, -1).T @ x.reshape(x.shape[0], c_in, -1)
        return F.fold(columns, (h_out, w_out), (kh, kw), padding=self.padding, stride=self.stride)

    def to(self, device: torch.device) -> "_FixedConv":
        return _FixedConv(
            self.transposed,
            self.weight.to(device),
            self.bias.to(device),
            self.frac_bits,
            self.stride,
            self.padding,
            self.output_padding,
        )


@dataclass(frozen=True)
class _FixedLeakyReLU:
    slope_numerator: int  # slope = numerator / 2^16; 0 is ReLU

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        negative = torch.floor(x * (self.slope_numerator * 2.0**-_SLOPE_BITS) + 0.5)
        return torch.where(x < 0, negative, x)

    def to(self, device: torch.device) -> "_FixedLeakyReLU":
        return self


def _conv_modules(layers: nn.Sequential) -> list[nn.Module]:
    return [m for m in layers if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]


def _integer_weight(conv: nn.Module, frac_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    weight = torch.round(conv.weight.detach().double().cpu() * 2.0**frac_bits)
    if conv.bias is None:
        bias = torch.zeros(conv.out_channels, dtype=torch.float64)
    else:
        bias = conv.bias.detach().double().cpu()
    return weight, torch.round(bias * 2.0 ** (frac_bits + ACT_FRAC_BITS))


def _worst_case(conv: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> float:
    """Largest |accumulator| any input within ±ACT_LIMIT can produce (per output channel)."""
    out_dim = 1 if isinstance(conv, nn.ConvTranspose2d) else 0
    abs_sum = weight.abs().transpose(0, out_dim).reshape(weight.shape[out_dim], -1).sum(dim=1)
    return float((abs_sum * ACT_LIMIT + bias.abs()).max())


def choose_weight_frac_bits(layers: nn.Sequential) -> tuple[int, ...]:
    """Per conv layer, the finest weight precision whose worst case stays exact."""
    chosen = []
    for conv in _conv_modules(layers):
        for bits in range(MAX_WEIGHT_FRAC_BITS, 0, -1):
            if _worst_case(conv, *_integer_weight(conv, bits)) < EXACT_LIMIT:
                chosen.append(bits)
                break
        else:
            raise IntegerNetError(f"{conv} has weights too large to run exactly in fixed point")
    return tuple(chosen)


class IntegerHyperSynthesis:
    """h_s as an exact fixed-point network. Input and output at ``ACT_FRAC_BITS`` fraction bits."""

    def __init__(self, layers: nn.Sequential, weight_frac_bits: tuple[int, ...]):
        convs = _conv_modules(layers)
        if len(convs) != len(weight_frac_bits):
            raise IntegerNetError(f"{len(convs)} conv layers but {len(weight_frac_bits)} precisions stored")
        bits = iter(weight_frac_bits)
        self.steps = [self._fixed_step(module, bits) for module in layers]

    @staticmethod
    def _fixed_step(module: nn.Module, bits) -> _FixedConv | _FixedLeakyReLU:
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            frac = next(bits)
            weight, bias = _integer_weight(module, frac)
            if _worst_case(module, weight, bias) >= EXACT_LIMIT:
                raise IntegerNetError(f"{module} at {frac} fraction bits can exceed the exact range")
            transposed = isinstance(module, nn.ConvTranspose2d)
            return _FixedConv(
                transposed,
                weight,
                bias,
                frac,
                tuple(module.stride),
                tuple(module.padding),
                tuple(module.output_padding) if transposed else (0, 0),
            )
        if isinstance(module, nn.LeakyReLU):
            return _FixedLeakyReLU(round(module.negative_slope * 2**_SLOPE_BITS))
        if isinstance(module, nn.ReLU):
            return _FixedLeakyReLU(0)
        raise IntegerNetError(f"layer {type(module).__name__} has no fixed-point form")

    def to(self, device: torch.device) -> "IntegerHyperSynthesis":
        self.steps = [step.to(device) for step in self.steps]
        return self

    def __call__(self, x_fixed: torch.Tensor) -> torch.Tensor:
        """Integer-valued float64 (B, C, h, w) -> integer-valued float64 parameters."""
        x = torch.clamp(x_fixed.double(), -ACT_LIMIT, ACT_LIMIT)
        for step in self.steps:
            x = step(x)
        return x


def to_fixed(values: torch.Tensor) -> torch.Tensor:
    """Real values -> integer-valued float64 at ``ACT_FRAC_BITS`` (exact for float32 input)."""
    return torch.round(values.double() * 2.0**ACT_FRAC_BITS)


def from_fixed(values: torch.Tensor) -> torch.Tensor:
    """Integer-valued fixed point -> float64 real values (exact)."""
    return values * 2.0**-ACT_FRAC_BITS
