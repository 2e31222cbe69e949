"""The conditional U-Net denoiser shared by NC-Diffusion, the Gaussian-start baseline and CorrDiff.

Value range: every image tensor in ``ncpipe.diffusion`` (x_t, x0, x̂, the conditioning image, the
sampler outputs) is in the **model range [-1, 1]**. The codec works in [0, 1]; the caller converts
once at the boundary with ``to_model_range`` before training/sampling and ``from_model_range``
after (the bridge is affine-equivariant, but the Gaussian-start process assumes zero-mean data of
roughly unit scale, as DDPM/CDC do, so one shared network range must be [-1, 1]).

::

    t (B,) ─> sinusoid ─> MLP ─(+ Linear(cond_vector))─> emb (B,E)      (emb feeds every ResBlock and AFFM)

    x_t (B,Cx,H,W) ─┐
    cond (B,Cc,H,W) ┴─ cat ─> conv ─> level 0 ─┬─> down ─> level 1 ─┬─> … ─> mid
                                              │                    │         │
                                            AFFM                 AFFM       up
                                              │                    │         │
    out (B,Cx,H,W) <─ GN,SiLU,conv <─ level 0 <─ cat <─ up <─ level 1 <─ cat ─┘

H and W must be multiples of ``2 ** (len(channel_mults) - 1)`` (``UNetConfig.size_multiple``);
pad before and crop after for other sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ncpipe.diffusion.affm import make_affm


def to_model_range(x: Tensor) -> Tensor:
    """[0, 1] (codec, metrics) -> [-1, 1] (everything in ncpipe.diffusion)."""
    return x * 2.0 - 1.0


def from_model_range(x: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((x + 1.0) * 0.5).clamp(0.0, 1.0)


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of the denoiser. ``cond_vector_dim`` > 0 adds a vector (e.g. rate / λ) to the time embedding."""

    in_channels: int = 3
    cond_channels: int = 3
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)
    blocks_per_level: int = 1
    time_embed_dim: int = 128
    cond_vector_dim: int = 0
    scale_cond_channels: int = 0  # > 0: a conditioning map per resolution level, added at every level
    affm: bool = True
    affm_grid: tuple[int, int] = (8, 8)
    affm_bands: int = 4
    norm_groups: int = 8
    dropout: float = 0.0

    def __post_init__(self) -> None:
        widths = [self.base_channels * m for m in self.channel_mults]
        if not widths or any(w % self.norm_groups for w in widths):
            raise ValueError(f"every level width {widths} must be divisible by norm_groups={self.norm_groups}")
        if self.blocks_per_level < 1:
            raise ValueError("blocks_per_level must be >= 1")

    @property
    def size_multiple(self) -> int:
        return 2 ** (len(self.channel_mults) - 1)

    @classmethod
    def from_dict(cls, data: dict) -> "UNetConfig":
        """From its JSON form (tuples stored as lists)."""
        return cls(**{**data, "channel_mults": tuple(data["channel_mults"]), "affm_grid": tuple(data["affm_grid"])})


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding (B, dim) of continuous t ∈ [0, 1] (Vaswani et al. 2017; Ho et al. 2020).

    t is scaled by 1000 so the frequencies span the same range as DDPM's integer-step embedding.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    """GN-SiLU-conv, FiLM by the embedding (scale-shift norm, Dhariwal & Nichol 2021), GN-SiLU-conv, + skip."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * cout)
        self.norm2, self.drop = nn.GroupNorm(groups, cout), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as its skip path: stable deep init
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1.0 + scale) + shift
        return self.skip(x) + self.conv2(self.drop(F.silu(h)))


class _Level(nn.Module):
    def __init__(self, cin: int, cout: int, cfg: UNetConfig) -> None:
        super().__init__()
        chans = [cin] + [cout] * cfg.blocks_per_level
        self.blocks = nn.ModuleList(
            ResBlock(a, b, cfg.time_embed_dim, cfg.norm_groups, cfg.dropout) for a, b in zip(chans, chans[1:])
        )

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        for block in self.blocks:
            h = block(h, emb)
        return h


class UNet(nn.Module):
    """``forward(x_t, t, cond=None, cond_vector=None) -> (B, in_channels, H, W)``, same shape as x_t.

    The output conv is zero-initialised: the raw output starts at 0, so with ``Denoiser``'s residual
    parameterisation the untrained refiner returns x_t (= x̂ at the first bridge step): it starts
    as the codec and can only learn improvements, rather than starting from a random image.
    """

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        widths = [cfg.base_channels * m for m in cfg.channel_mults]
        e = cfg.time_embed_dim
        self.time_mlp = nn.Sequential(nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e))
        self.vector_proj = nn.Linear(cfg.cond_vector_dim, e) if cfg.cond_vector_dim > 0 else None
        self.conv_in = nn.Conv2d(cfg.in_channels + cfg.cond_channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList(_Level(a, b, cfg) for a, b in zip([widths[0]] + widths[:-1], widths))
        self.downsample = nn.ModuleList(nn.Conv2d(w, w, 3, stride=2, padding=1) for w in widths[:-1])
        self.mid = ResBlock(widths[-1], widths[-1], e, cfg.norm_groups, cfg.dropout)
        self.upsample = nn.ModuleList(nn.Conv2d(w, w, 3, padding=1) for w in widths[1:])
        self.skip_filters = nn.ModuleList(
            make_affm(w, e, cfg.affm, grid=cfg.affm_grid, bands=cfg.affm_bands) for w in widths[:-1]
        )
        self.up = nn.ModuleList(_Level(widths[i + 1] + widths[i], widths[i], cfg) for i in range(len(widths) - 1))
        self.norm_out = nn.GroupNorm(cfg.norm_groups, widths[0])
        self.conv_out = nn.Conv2d(widths[0], cfg.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        # Multi-scale conditioning: a zero-initialised 1x1 projection of the level's map into the features
        # entering each down level, the middle block and each up level (none when scale_cond_channels = 0).
        entering = [widths[0]] + widths[:-1] + [widths[-1]] + widths[1:]
        self.scale_in = nn.ModuleList(_zero_conv1x1(cfg.scale_cond_channels, w) for w in entering) \
            if cfg.scale_cond_channels else None

    def embed(self, t: Tensor, cond_vector: Tensor | None) -> Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.cfg.time_embed_dim))
        if self.vector_proj is not None:
            if cond_vector is None:
                raise ValueError(f"this UNet needs a cond_vector of size {self.cfg.cond_vector_dim}")
            emb = emb + self.vector_proj(cond_vector.to(emb.dtype).reshape(len(t), -1))
        return emb

    def _check(self, x_t: Tensor, t: Tensor, cond: Tensor | None) -> None:
        m = self.cfg.size_multiple
        if x_t.shape[-2] % m or x_t.shape[-1] % m:
            raise ValueError(f"H, W = {tuple(x_t.shape[-2:])} must be multiples of {m}; pad the input first")
        if t.shape != (x_t.shape[0],):
            raise ValueError(f"t must have shape (B,) = ({x_t.shape[0]},), got {tuple(t.shape)}")
        if (cond is None) != (self.cfg.cond_channels == 0):
            raise ValueError(f"cond must be a (B,{self.cfg.cond_channels},H,W) tensor (None iff cond_channels=0)")

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None, cond_vector: Tensor | None = None,
                scale_cond: Sequence[Tensor] | None = None) -> Tensor:
        """``scale_cond``: one (B, scale_cond_channels, H/2^i, W/2^i) map per level i (``scale_cond_channels`` > 0)."""
        self._check(x_t, t, cond)
        inject = self._injector(scale_cond, x_t)
        emb = self.embed(t, cond_vector)
        h = self.conv_in(x_t if cond is None else torch.cat([x_t, cond.to(x_t.dtype)], dim=1))
        skips = []
        for i, level in enumerate(self.down):
            h = level(inject(h, i, i), emb)
            if i < len(self.downsample):
                skips.append(h)
                h = self.downsample[i](h)
        levels = len(self.down)
        h = self.mid(inject(h, levels, levels - 1), emb)
        for i in reversed(range(len(self.up))):
            h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
            h = inject(h, levels + 1 + i, i)
            h = self.up[i](torch.cat([h, self.skip_filters[i](skips[i], emb)], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))

    def _injector(self, scale_cond: Sequence[Tensor] | None, x_t: Tensor) -> Callable[[Tensor, int, int], Tensor]:
        """``inject(h, projection index, level)``: h plus the projected map of its level (h itself without maps)."""
        if self.scale_in is None:
            return lambda h, index, level: h
        if scale_cond is None or len(scale_cond) != len(self.down):
            raise ValueError(f"this UNet needs scale_cond: one map per level ({len(self.down)})")
        for level, cmap in enumerate(scale_cond):
            expected = (x_t.shape[0], self.cfg.scale_cond_channels, x_t.shape[-2] >> level, x_t.shape[-1] >> level)
            if tuple(cmap.shape) != expected:
                raise ValueError(f"scale_cond[{level}] must have shape {expected}, got {tuple(cmap.shape)}")
        return lambda h, index, level: h + self.scale_in[index](scale_cond[level].to(h.dtype))


Parameterization = Literal["residual", "x0"]


class Denoiser(nn.Module):
    """Wraps a ``UNet`` into an x0 predictor: ``x0_hat = x_t + F(…)`` ("residual") or ``F(…)`` ("x0").

    "residual" (default, for the bridge) makes F predict x0 − x_t = −η·(x̂ − x0), the part of the
    codec error still in x_t (ResShift / InDI-style restoration); "x0" suits the
    Gaussian start, where x_t is mostly noise. Training losses and samplers both go through this
    wrapper, so the parameterisation is invisible to them.
    """

    def __init__(self, net: UNet, parameterization: Parameterization = "residual") -> None:
        super().__init__()
        if parameterization not in ("residual", "x0"):
            raise ValueError(f"parameterization must be 'residual' or 'x0', got {parameterization!r}")
        self.net, self.parameterization = net, parameterization

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None, cond_vector: Tensor | None = None,
                scale_cond: Sequence[Tensor] | None = None) -> Tensor:
        out = self.net(x_t, t, cond, cond_vector, scale_cond)
        return x_t + out if self.parameterization == "residual" else out

    def bind(self, cond: Tensor | None, cond_vector: Tensor | None = None,
             scale_cond: Sequence[Tensor] | None = None) -> Callable[[Tensor, Tensor], Tensor]:
        """The sampler-facing closure ``denoise(x_t, t) -> x0_hat`` with the conditioning fixed."""
        return lambda x_t, t: self(x_t, t, cond, cond_vector, scale_cond)


def _zero_conv1x1(cin: int, cout: int) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, 1)
    nn.init.zeros_(conv.weight)  # starts as no conditioning: the network's other inputs decide at init
    nn.init.zeros_(conv.bias)
    return conv
