"""Adaptive Frequency-domain Filtering Module (AFFM) for U-Net skip connections (NC-Diffusion).

A zero-phase filter G applied to each channel of a skip feature map s in the 2-D Fourier domain::

    s (B,C,H,W) ──rfft2 (float32)──> S (B,C,H,W//2+1) ──× (G − 1)──irfft2(s=(H,W))──> d ──(+ s)──> out
         │                                                 ▲
         └─ mean over H,W (B,C) ─┐                         │
    emb (B,E) ───────────────────┴─> MLP ─> m (B,C,K) ─────┤  log G = b·tanh((Ls + Σ_k m_k φ_k) / b)
                          static response Ls (C,gy,gx) ────┘  resampled to the (H, W//2+1) bins

    out = s + irfft2( rfft2(s) · (G − 1) ),   G_{b,c}(f) = exp(b·tanh((Ls_c(f) + Σ_k m_{b,c,k} φ_k(|f|)) / b))

* Ls_c is a learned per-channel response on a fixed gy × gx grid of frequencies (|f_y|, f_x) ∈
  [0, ½]², bilinearly resampled to the actual rfft size, so any H, W (odd or even) works.
* m = MLP([mean_{HW}(s), emb]) weights K radial hat bands φ_k(|f|): the input- and time-adaptive part.
* G depends on |f_y| and f_x only and is real, so it is even and zero-phase: the filtered map is
  exactly what ``irfft2`` of the full Hermitian spectrum gives, with no phase shift of features.
* Log-gain, softly bounded by b = ``max_log_gain`` (gains within [e^-b, e^b]), so amplification of
  the high frequencies quantization removed stays stable; both Ls and the MLP's last layer start at
  zero, so G = 1 and ``out`` is ``s`` **exactly** at init (the residual form adds an exact zero
  instead of a rounded FFT round trip), and both get gradients from the first step.

Compare FreeU (Si et al. 2024), which scales a low-frequency box of skip features by fixed factors;
AFFM learns the response and adapts it per image and per diffusion time.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def hat_basis(pos: Tensor, num: int) -> Tensor:
    """Piecewise-linear interpolation weights (N, num) of positions in [0, 1] on ``num`` even nodes."""
    nodes = torch.arange(num, dtype=pos.dtype, device=pos.device)
    return (1.0 - (pos[:, None] * (num - 1) - nodes).abs()).clamp_min(0.0)


class AFFM(nn.Module):
    """Identity-initialised adaptive frequency filter for one skip connection; ``forward(s, emb)``."""

    def __init__(
        self, channels: int, emb_dim: int, grid: tuple[int, int] = (8, 8), bands: int = 4,
        max_log_gain: float = 2.0,
    ) -> None:
        super().__init__()
        if min(grid) < 2 or bands < 2:
            raise ValueError("AFFM needs a grid of at least 2x2 frequency nodes and at least 2 bands")
        self.channels, self.emb_dim, self.bands, self.max_log_gain = channels, emb_dim, bands, max_log_gain
        self.static = nn.Parameter(torch.zeros(channels, *grid))  # log-gain Ls on the fixed grid
        hidden = max(32, channels)
        self.mlp = nn.Sequential(nn.Linear(channels + emb_dim, hidden), nn.SiLU(), nn.Linear(hidden, channels * bands))
        nn.init.zeros_(self.mlp[-1].weight)  # zero adaptive part at init -> exact identity
        nn.init.zeros_(self.mlp[-1].bias)

    def log_gain(self, s: Tensor, emb: Tensor | None) -> Tensor:
        """log G (B, C, H, W//2+1) in float32 (float64 for float64 input)."""
        h, w = s.shape[-2:]
        dtype = torch.promote_types(s.dtype, torch.float32)
        fy = torch.fft.fftfreq(h, device=s.device, dtype=dtype).abs() * 2.0  # |f_y| / Nyquist, in [0, 1]
        fx = torch.fft.rfftfreq(w, device=s.device, dtype=dtype) * 2.0
        ay, ax = hat_basis(fy, self.static.shape[1]), hat_basis(fx, self.static.shape[2])
        static = torch.einsum("hi,cij,wj->chw", ay, self.static.to(dtype), ax)
        radius = (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt() / math.sqrt(2.0)  # in [0, 1]
        phi = hat_basis(radius.flatten(), self.bands).T.reshape(self.bands, h, -1)
        m = self.mlp(self._mlp_input(s, emb)).to(dtype).view(s.shape[0], self.channels, self.bands)
        raw = static + torch.einsum("bck,khw->bchw", m, phi)
        b = self.max_log_gain
        return b * torch.tanh(raw / b)

    def _mlp_input(self, s: Tensor, emb: Tensor | None) -> Tensor:
        wdtype = self.mlp[0].weight.dtype
        pooled = s.to(wdtype).mean(dim=(-2, -1))
        if self.emb_dim == 0:
            return pooled
        if emb is None:
            raise ValueError(f"this AFFM was built for a {self.emb_dim}-dim embedding; pass emb")
        return torch.cat([pooled, emb.to(wdtype)], dim=1)

    def forward(self, s: Tensor, emb: Tensor | None = None) -> Tensor:
        # FFTs in float32 even under autocast: half-precision cuFFT only takes power-of-2 sizes and
        # high-frequency gains of a few x would lose most of a bfloat16 mantissa.
        with torch.autocast(device_type=s.device.type, enabled=False):
            h, w = s.shape[-2:]
            x = s.to(torch.promote_types(s.dtype, torch.float32))
            gain_minus_one = torch.expm1(self.log_gain(s, emb))  # exactly 0 at init
            delta = torch.fft.irfft2(torch.fft.rfft2(x) * gain_minus_one, s=(h, w))
        return s + delta.to(s.dtype)


class SkipIdentity(nn.Identity):
    """What a skip connection holds when AFFM is switched off: returns s, ignores the embedding."""

    def forward(self, s: Tensor, emb: Tensor | None = None) -> Tensor:  # type: ignore[override]
        return s


def make_affm(channels: int, emb_dim: int, enabled: bool = True, **kwargs: object) -> nn.Module:
    """An ``AFFM`` or, when ``enabled`` is False, a ``SkipIdentity`` with the same call signature."""
    return AFFM(channels, emb_dim, **kwargs) if enabled else SkipIdentity()  # type: ignore[arg-type]
