"""CorrDiff: a diffusion decoder conditioned on ŷ, corrected toward the codec's x̂ by transmitted coefficients.

Method background: arXiv 2404.04916; what is implemented and
measured: ``docs/corrdiff.md``. Images are in the model range [-1, 1] inside, [0, 1] at the boundary.

::

    ŷ (B,M,h,w) ─conv3x3 M→C─SiLU─conv1x1 C→F·16²─PixelShuffle(16)─> cond (B,F,16h,16w)   LatentConditioner
                                                                         │
    x_T = noise(seed) ──> denoise(x_t, t | cond) = x0_diff ─clamp─┐      │  Denoiser(UNet), x0-parameterised
                                                                  ▼
                        x0_corr = (1 − λ_t)·x0_diff + λ_t·x̂       (the sampler's guidance hook)
                                                                  │
                        x_s = DDIM(x_t, x0_corr, ᾱ(t), ᾱ(s))  ──> … ──> x_0 = x0_corr of the last step

    encoder (sees x):  λ*_t = clamp(⟨x − x0_diff, x̂ − x0_diff⟩ / ‖x̂ − x0_diff‖², 0, 1)  per image and step,
                       quantized to b bits, and the *quantized* λ̃_t continues the sampler
    decoder:           λ_t = knob(λ̃_t, p): p = 0 → 1 (x̂ exactly), p = ½ → λ̃_t (the encoder's replay),
                       p = 1 → 0 (the uncorrected diffusion sample)

x̂ never enters the network: it only enters through the correction. The seed of the starting noise,
K, b and the λ̃ indexes travel in the bitstream (``ncpipe.bitstream.CorrectionCoefficients``, extension
kind 1), so the output is a function of the bitstream and p alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ncpipe import bitstream as fmt
from ncpipe.bitstream import LATENT_STRIDE, CorrectionCoefficients
from ncpipe.diffusion.refiner import (
    DecodedBatch,
    TrainedCodec,
    canvas_size,
    decoded_batch,
    decoder_digest,
    fit_canvas,
    jsonable,
    read_weights_checkpoint,
    weights_checkpoint,
    write_checkpoint,
)
from ncpipe.diffusion.samplers import Denoise, sample_ddim, seeded_noise
from ncpipe.diffusion.schedules import ddim_timesteps
from ncpipe.diffusion.unet import Denoiser, UNet, UNetConfig, to_model_range
from ncpipe.errors import NcpipeError
from ncpipe.models.registry import resolve_model

CORRDIFF_FORMAT = "ncpipe-corrdiff/1"
CORRDIFF_FILE = "corrdiff.pt"
# The knob value at which the decoder replays exactly what the encoder optimised (see knob_coefficient).
TRANSMITTED_PERCEPTION = 0.5

CoefficientRule = Callable[[int, Tensor], Tensor]  # (step index, x0_diff (B,3,H,W)) -> λ (B,) or (B, 3) float64


class CorrDiffError(NcpipeError, ValueError):
    """A CorrDiff checkpoint or coefficient set is missing, malformed, or not the one asked for."""


class CorrDiffMismatchError(CorrDiffError):
    """The decoder was trained for another codec, or the coefficients were computed for another decoder."""


@dataclass(frozen=True)
class CorrDiffConfig:
    """The diffusion decoder's network and the encoder's defaults (stored in its checkpoint, hashed).

    ``unet.in_channels`` = 3 and ``unet.cond_channels`` = ``latent_features`` are derived here.
    ``steps`` K and ``bits`` b are what the encoder uses unless told otherwise; the decoder always
    takes them from the bitstream. ``multiscale``: the conditioner's latent-grid features also enter
    every U-Net level at that level's resolution (``unet.scale_cond_channels`` = ``conditioner_hidden``).
    ``coefficient_groups``: 1 transmits one λ per step, 3 one per step and RGB channel (3K coefficients,
    step-major), each counted in the bitstream's bytes.
    """

    latent_channels: int  # M of the codec whose ŷ conditions the network
    unet: UNetConfig = UNetConfig()
    latent_features: int = 8  # F: channels of the image-resolution conditioning map
    conditioner_hidden: int = 64  # C: width of the conditioner's 3x3 conv on the latent grid
    steps: int = 4
    bits: int = 4
    clip_x0: bool = True
    multiscale: bool = False
    coefficient_groups: int = 1  # 1: per step; 3: per step and RGB channel

    def __post_init__(self) -> None:
        if self.latent_channels < 1 or self.latent_features < 1 or self.conditioner_hidden < 1:
            raise ValueError("latent_channels, latent_features and conditioner_hidden must be >= 1")
        if self.coefficient_groups not in (1, 3):
            raise ValueError(f"coefficient_groups must be 1 (per step) or 3 (per step and channel), "
                             f"got {self.coefficient_groups}")
        if not 1 <= self.steps <= self.max_steps:
            raise ValueError(f"steps must be in 1..{self.max_steps}, got {self.steps}")
        if self.multiscale and self.unet.size_multiple > LATENT_STRIDE:
            raise ValueError("multiscale conditioning needs U-Net levels no coarser than the 16-pixel latent grid")
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be in 1..8, got {self.bits}")
        if LATENT_STRIDE % self.unet.size_multiple and self.unet.size_multiple % LATENT_STRIDE:
            raise ValueError(f"the U-Net's size multiple {self.unet.size_multiple} must divide or be divided by 16")
        unet = dataclasses.replace(self.unet, in_channels=3, cond_channels=self.latent_features, cond_vector_dim=0,
                                   scale_cond_channels=self.conditioner_hidden if self.multiscale else 0)
        object.__setattr__(self, "unet", unet)

    @property
    def max_steps(self) -> int:
        """The most sampler steps whose coefficients one bitstream extension can carry."""
        return fmt.MAX_CORRECTION_STEPS // self.coefficient_groups

    def to_dict(self) -> dict[str, Any]:
        return jsonable(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CorrDiffConfig":
        return cls(**{**data, "unet": UNetConfig.from_dict(data["unet"])})


class LatentConditioner(nn.Module):
    """ŷ (B, M, h, w) -> (B, F, 16h, 16w): conv3x3 M→C, SiLU, conv1x1 C→F·16², PixelShuffle(16).

    Each 16x16 pixel block gets its own learned (non-linear) function of its latent vector and its 8
    neighbours: the conditioning map carries per-pixel structure inside a block, which a 1x1
    projection followed by bilinear upsampling (a smooth field) cannot, and its size is exactly the
    codec's padded canvas, so nothing is interpolated or cropped.
    """

    def __init__(self, latent_channels: int, features: int, hidden: int) -> None:
        super().__init__()
        self.latent = nn.Conv2d(latent_channels, hidden, 3, padding=1)
        self.expand = nn.Conv2d(hidden, features * LATENT_STRIDE**2, 1)
        self.shuffle = nn.PixelShuffle(LATENT_STRIDE)

    def forward(self, y_hat: Tensor) -> Tensor:
        return self.shuffle(self.expand(self.hidden(y_hat)))

    def hidden(self, y_hat: Tensor) -> Tensor:
        """The latent-grid features (B, C, h, w) the full-resolution map is expanded from."""
        return F.silu(self.latent(y_hat))

    def pyramid(self, y_hat: Tensor, canvas: Sequence[int], levels: int) -> list[Tensor]:
        """The latent-grid features at each U-Net level's resolution (level i: canvas / 2^i).

        Each latent's features cover its 16 / 2^i pixel block (nearest upsampling keeps the blocks
        aligned with the codec's grid), then cropped or edge-extended to the level's canvas.
        """
        hidden = self.hidden(y_hat)
        maps = []
        for level in range(levels):
            factor = LATENT_STRIDE >> level
            size = (int(canvas[0]) >> level, int(canvas[1]) >> level)
            maps.append(fit_canvas(F.interpolate(hidden, scale_factor=float(factor), mode="nearest"), size))
        return maps


class CorrDiffDecoder(nn.Module):
    """``Denoiser(UNet, "x0")`` conditioned on ``LatentConditioner(ŷ)``; bound to one codec checkpoint."""

    def __init__(self, config: CorrDiffConfig, codec: TrainedCodec) -> None:
        super().__init__()
        self.config, self.codec = config, codec
        self.conditioner = LatentConditioner(config.latent_channels, config.latent_features, config.conditioner_hidden)
        self.denoiser = Denoiser(UNet(config.unet), "x0")
        self.sha256: str | None = None  # set when saved or loaded
        self.provenance: dict[str, Any] = {}

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, x_t: Tensor, t: Tensor, y_hat: Tensor) -> Tensor:
        """x0_diff (model range) for a training batch; x_t is (B, 3, 16h, 16w) for ŷ (B, M, h, w)."""
        cond, scales = self.conditioning(y_hat.to(x_t.dtype), x_t.shape[-2:])
        return self.denoiser(x_t, t, cond, None, scales)

    def conditioning(self, y_hat: Tensor, canvas: Sequence[int]) -> tuple[Tensor, list[Tensor] | None]:
        """(the full-resolution map on the canvas, the per-level maps when ``multiscale``, else None)."""
        cond = fit_canvas(self.conditioner(y_hat), canvas)
        if not self.config.multiscale:
            return cond, None
        return cond, self.conditioner.pyramid(y_hat, canvas, len(self.config.unet.channel_mults))

    def denoise_fn(self, y_hat: Tensor, canvas: Sequence[int]) -> Denoise:
        """The sampler-facing ``denoise(x_t, t) -> x0_diff`` with the conditioning computed once."""
        # a contiguous ŷ: the encoder's (from analyse) and the decoder's (from decode_symbols) come in different
        # memory layouts, and a convolution's float result depends on the layout it is given
        cond, scales = self.conditioning(y_hat.contiguous(), canvas)
        bound = self.denoiser.bind(cond, None, scales)
        if not self.config.clip_x0:
            return bound
        return lambda x_t, t: bound(x_t, t).clamp(-1.0, 1.0)

    def identity(self) -> str:
        """The decoder's SHA-256 (set on save/load; computed from the current weights otherwise)."""
        return self.sha256 or decoder_digest(corrdiff_checkpoint(self, {}))

    def check_codec(self, sha256: str) -> None:
        """Raise ``CorrDiffMismatchError`` unless this decoder was trained for codec ``sha256``."""
        if sha256 == self.codec.sha256:
            return
        from ncpipe.models.registry import describe_sha256

        raise CorrDiffMismatchError(
            f"CorrDiff decoder {self.identity()[:12]} was trained for {self.codec.arch} λ={self.codec.rate:g} "
            f"{describe_sha256(self.codec.sha256)}, not for codec {describe_sha256(sha256)}: use the decoder "
            "trained for this codec, or train one with `ncpipe train corrdiff --codec <this codec>`"
        )


# -- the method's pure functions --------------------------------------------------------------


def optimal_coefficient(x0_diff: Tensor, x_hat: Tensor, x: Tensor, per_channel: bool = False) -> Tensor:
    """λ* = argmin_λ ‖x0_diff + λ(x̂ − x0_diff) − x‖² per image (B,), or per image and channel (B, C)
    with ``per_channel``, clamped to [0, 1], float64.

    λ* = ⟨x − x0_diff, x̂ − x0_diff⟩ / ‖x̂ − x0_diff‖²; 0 where x̂ = x0_diff (every λ is then optimal).
    Affine-invariant: the same in [0, 1] and in [-1, 1].
    """
    if not x0_diff.shape == x_hat.shape == x.shape:
        raise ValueError(f"shapes differ: {tuple(x0_diff.shape)}, {tuple(x_hat.shape)}, {tuple(x.shape)}")
    keep = 2 if per_channel else 1
    direction = (x_hat - x0_diff).double().flatten(keep)
    target = (x - x0_diff).double().flatten(keep)
    num, den = (direction * target).sum(-1), direction.square().sum(-1)
    lam = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))
    return lam.clamp(0.0, 1.0)


def corrected_estimate(x0_diff: Tensor, x_hat: Tensor, lam: Tensor | float) -> Tensor:
    """x0_corr = (1 − λ)·x0_diff + λ·x̂, λ a scalar, one per image (B,) or one per image and channel (B, C);
    exactly x0_diff at λ = 0 and x̂ at λ = 1."""
    lam = torch.as_tensor(lam, dtype=x0_diff.dtype, device=x0_diff.device)
    if lam.ndim == 0:
        lam = lam.expand(x0_diff.shape[0])
    lam = lam.reshape(*lam.shape, *([1] * (x0_diff.ndim - lam.ndim)))
    return (1.0 - lam) * x0_diff + lam * x_hat


def knob_coefficient(lam_star: Tensor | float, perception: float) -> Tensor:
    """The user's distortion-perception knob p ∈ [0, 1] applied to the transmitted λ̃ (float64).

    Piecewise linear through three anchors: p = 0 → 1 (the end-to-end decoder's x̂ at every step),
    p = ½ → λ̃ (what the encoder optimised and replayed), p = 1 → 0 (pure diffusion)::

        λ(p) = (1 − 2p)·1 + 2p·λ̃          for p ≤ ½
        λ(p) = (2 − 2p)·λ̃                  for p ≥ ½

    Non-increasing in p for every λ̃ ∈ [0, 1], continuous, and exact at the three anchors.
    """
    if not 0.0 <= perception <= 1.0:
        raise ValueError(f"perception must be in [0, 1] (0: end-to-end decoder, 1: pure diffusion), got {perception}")
    lam = torch.as_tensor(lam_star, dtype=torch.float64)
    if perception == TRANSMITTED_PERCEPTION:
        return lam.clone()
    if perception < TRANSMITTED_PERCEPTION:
        w = perception / TRANSMITTED_PERCEPTION
        return (1.0 - w) + w * lam
    w = (perception - TRANSMITTED_PERCEPTION) / (1.0 - TRANSMITTED_PERCEPTION)
    return (1.0 - w) * lam


def transmitted_seed(key: str) -> int:
    """The u32 noise seed the encoder writes: the first 4 bytes (little-endian) of SHA-256(key)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:4], "little")


def start_noise(seeds: Sequence[int], shape: Sequence[int], device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> Tensor:
    """x_T for each image from its u32 seed (``seeded_noise`` keyed by ``corrdiff-seed/<seed>``)."""
    return seeded_noise([f"corrdiff-seed/{int(s)}" for s in seeds], shape, device, dtype)


def sample_corrected(denoise: Denoise, noise: Tensor, x_hat: Tensor, steps: int, rule: CoefficientRule) -> Tensor:
    """DDIM from ``noise`` over K steps with x0 replaced by the corrected estimate at every step.

    ``rule(step, x0_diff) -> λ (B,)`` chooses each step's coefficients (the encoder's optimum, or
    the decoder's knob of the transmitted ones); everything else is ``samplers.sample_ddim``.
    """
    def hook(x0_diff: Tensor, step: int) -> Tensor:
        return corrected_estimate(x0_diff, x_hat, rule(step, x0_diff).to(x0_diff.device))

    return sample_ddim(denoise, noise, ddim_timesteps(steps), guidance=hook)


# -- encoder and decoder ---------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedCorrections:
    """What the encoder computed: the coefficients to transmit, and its own replay of the decoder."""

    coefficients: tuple[CorrectionCoefficients, ...]
    replay: tuple[Tensor, ...]  # (3, h, w) in [0, 1]: the decoder's output at p = ½, bit for bit on this device
    optimal: tuple[tuple[float, ...], ...]  # λ*_t before quantization, per image


@dataclass
class _Canvas:
    """A batch laid on the sampler's canvas, model range."""

    x_hat01: Tensor  # (B, 3, Hc, Wc) in [0, 1]
    x_hat: Tensor  # same, in [-1, 1]
    denoise: Denoise
    sizes: tuple[tuple[int, int], ...]


def _canvas(decoder: CorrDiffDecoder, decoded: DecodedBatch) -> _Canvas:
    for sha in dict.fromkeys(decoded.codec_sha256):
        decoder.check_codec(sha)
    device = decoder.device
    canvas = canvas_size(decoded.padded, decoder.config.unet.size_multiple)
    x_hat01 = torch.cat([fit_canvas(x.to(device).float()[None], canvas) for x in decoded.x_hat]).contiguous()
    denoise = decoder.denoise_fn(decoded.y_hat.to(device).float(), canvas)
    return _Canvas(x_hat01, to_model_range(x_hat01), denoise, decoded.sizes)


def _output(canvas: _Canvas, x0: Tensor) -> tuple[Tensor, ...]:
    """x̂ + ½(x_0 − x̂) in [0, 1], cropped and clamped: exactly x̂ where x_0 = x̂ (the p = 0 endpoint)."""
    out = canvas.x_hat01 + 0.5 * (x0 - canvas.x_hat)
    return tuple(out[i, :, :h, :w].clamp(0.0, 1.0) for i, (h, w) in enumerate(canvas.sizes))


def compute_corrections(
    decoder: CorrDiffDecoder, decoded: DecodedBatch, originals: Sequence[Tensor], *, steps: int | None = None,
    bits: int | None = None, seeds: Sequence[int] | None = None,
) -> EncodedCorrections:
    """The encoder: run the decoder's sampler, choosing and quantizing λ_t per image at each step.

    ``decoded`` is what the decoder will hold (``encoder_batch`` builds it from ``LearnedCodec.analyse``);
    ``originals`` are the images (3, h, w) in [0, 1]. λ*_t is the least-squares optimum over each image's
    own (h, w) pixels (and per RGB channel when the decoder's ``coefficient_groups`` is 3); its b-bit
    quantization λ̃_t is what continues the sampler, so the decoder's replay at p = ½ reproduces the
    encoder's trajectory. ``seeds`` default to ``transmitted_seed(key)``.
    """
    steps = decoder.config.steps if steps is None else steps
    bits = decoder.config.bits if bits is None else bits
    per_channel = decoder.config.coefficient_groups > 1
    if not 1 <= steps <= decoder.config.max_steps:
        raise ValueError(f"steps must be in 1..{decoder.config.max_steps} for this decoder, got {steps}")
    seeds = tuple(transmitted_seed(k) for k in decoded.keys) if seeds is None else tuple(int(s) for s in seeds)
    if len(originals) != len(decoded.x_hat) or len(seeds) != len(originals):
        raise ValueError(f"{len(originals)} originals and {len(seeds)} seeds for {len(decoded.x_hat)} images")
    sha = decoder.identity()
    with torch.inference_mode(False), torch.no_grad():
        canvas = _canvas(decoder, decoded)
        device = canvas.x_hat.device
        targets = [to_model_range(x.to(device).float()) for x in originals]
        for x, (h, w) in zip(targets, canvas.sizes):
            if tuple(x.shape) != (3, h, w):
                raise ValueError(f"an original of shape {tuple(x.shape)} for an image of size {(h, w)}")
        indexes: list[list[int]] = [[] for _ in seeds]
        optimal: list[list[float]] = [[] for _ in seeds]

        def rule(step: int, x0_diff: Tensor) -> Tensor:
            values = []
            for i, ((h, w), x) in enumerate(zip(canvas.sizes, targets)):
                crop = (slice(i, i + 1), slice(None), slice(0, h), slice(0, w))
                lam = optimal_coefficient(x0_diff[crop], canvas.x_hat[crop], x[None], per_channel)[0].reshape(-1)
                quantized = CorrectionCoefficients.quantize(sha, seeds[i], bits, lam.tolist())
                optimal[i].extend(lam.tolist())
                indexes[i].extend(quantized.indexes)
                values.append(quantized.values)
            return knob_coefficient(torch.tensor(values, dtype=torch.float64).squeeze(-1), TRANSMITTED_PERCEPTION)

        noise = start_noise(seeds, canvas.x_hat.shape[1:], device, canvas.x_hat.dtype)
        x0 = sample_corrected(canvas.denoise, noise, canvas.x_hat, steps, rule)
        replay = _output(canvas, x0)
    coefficients = tuple(CorrectionCoefficients(sha, s, bits, tuple(ix)) for s, ix in zip(seeds, indexes))
    return EncodedCorrections(coefficients, replay, tuple(tuple(o) for o in optimal))


def encode_corrections(
    decoder: CorrDiffDecoder, decoded: DecodedBatch, originals: Sequence[Tensor], *, steps: int | None = None,
    bits: int | None = None, seeds: Sequence[int] | None = None,
) -> tuple[CorrectionCoefficients, ...]:
    """The coefficients to transmit for each image (see ``compute_corrections``)."""
    return compute_corrections(decoder, decoded, originals, steps=steps, bits=bits, seeds=seeds).coefficients


def decode_with_corrections(
    decoder: CorrDiffDecoder, decoded: DecodedBatch, coefficients: Sequence[CorrectionCoefficients],
    perception: float = TRANSMITTED_PERCEPTION,
) -> tuple[Tensor, ...]:
    """The decoder: replay the sampler with λ_t = knob(λ̃_t, p); images (3, h, w) in [0, 1] on its device.

    p = 0 returns x̂ bit for bit, p = ½ the encoder's replay, p = 1 the uncorrected DDIM sample from
    the transmitted seed. Every image of a batch must carry coefficients for this decoder and one K.
    """
    if len(coefficients) != len(decoded.x_hat):
        raise ValueError(f"{len(coefficients)} coefficient sets for {len(decoded.x_hat)} images")
    sha = decoder.identity()
    for c in coefficients:
        if c.decoder_sha256 != sha:
            raise CorrDiffMismatchError(
                f"the coefficients were computed for CorrDiff decoder {c.decoder_sha256}, but decoder {sha} is "
                "loaded: decode with the decoder the archive was compressed for"
            )
    groups = decoder.config.coefficient_groups
    counts = {len(c.indexes) for c in coefficients}
    if len(counts) != 1 or next(iter(counts)) % groups:
        raise ValueError(f"one decode batch needs one step count K of {groups} coefficient(s) each; "
                         f"got {sorted(counts)} coefficients")
    steps = counts.pop() // groups
    values = torch.tensor([c.values for c in coefficients], dtype=torch.float64).view(len(coefficients), steps, groups)
    lambdas = knob_coefficient(values.squeeze(-1) if groups == 1 else values, perception)
    with torch.inference_mode(False), torch.no_grad():
        canvas = _canvas(decoder, decoded)
        noise = start_noise([c.seed for c in coefficients], canvas.x_hat.shape[1:], canvas.x_hat.device,
                            canvas.x_hat.dtype)
        x0 = sample_corrected(canvas.denoise, noise, canvas.x_hat, steps, lambda step, _: lambdas[:, step])
        return _output(canvas, x0)


# -- the pipeline's entry points (a few lines per side) -----------------------------------------


def encoder_batch(codec, analysed, keys: Sequence[str]) -> DecodedBatch:
    """What the decoder will hold, built at the encoder from ``LearnedCodec.analyse(images, reconstruct=True)``.

    ŷ = Δ_q · y_sym + μ with μ the exact integer means analyse derived (what the decoder derives), and
    x̂ the analyse reconstruction (the decoder's ``synthesise`` output; computed here when absent).
    """
    from ncpipe.codec import padded_shape

    sizes = analysed.sizes
    padded = {padded_shape(h, w) for h, w in sizes}
    if len(padded) != 1:
        raise ValueError(f"one batch must share one padded size, got {sorted(padded)}")
    headers = [codec.header_for(h, w, "RGB", analysed.quality) for h, w in sizes]
    symbols = [analysed.symbols(i) for i in range(len(sizes))]
    with torch.inference_mode():
        y_hat = codec.latents(headers, symbols)
    x_hat = analysed.reconstructions
    if x_hat is None:
        x_hat = codec.synthesise(headers, symbols)
    identity = codec.model.identity
    return DecodedBatch(
        x_hat=tuple(x.clone() for x in x_hat), y_hat=y_hat.clone(), sizes=tuple(sizes), padded=padded.pop(),
        rates=(codec.model.rate_of(analysed.quality),) * len(sizes), codec_sha256=(identity.sha256,) * len(sizes),
        keys=tuple(keys), qualities=(analysed.quality,) * len(sizes),
    )


def corrections_for_images(decoder: CorrDiffDecoder, codec, analysed, images: Sequence[np.ndarray],
                           keys: Sequence[str], steps: int | None = None,
                           bits: int | None = None) -> tuple[CorrectionCoefficients, ...]:
    """Encoder side: (codec, analysed batch, original HxWx3 uint8 images, sample keys) -> coefficients per image."""
    decoded = encoder_batch(codec, analysed, keys)
    # a copy: decoded pixels may be read-only views (PIL's buffer), which torch.from_numpy warns about
    originals = [torch.tensor(p).permute(2, 0, 1).float().div(255.0) for p in images]
    return encode_corrections(decoder, decoded, originals, steps=steps, bits=bits)


def attach_corrections(data: bytes, coefficients: CorrectionCoefficients) -> bytes:
    """A bitstream (v1 or v2) with its CorrDiff extension set: written as version 2."""
    parsed = fmt.parse(data, max_pixels=None)
    others = tuple(e for e in parsed.extensions if e.kind != fmt.EXTENSION_CORRDIFF)
    return fmt.pack(dataclasses.replace(parsed, extensions=(*others, coefficients.to_extension())))


def read_corrections(data: bytes | fmt.Bitstream) -> CorrectionCoefficients | None:
    """The CorrDiff coefficients a bitstream carries, or None (a version-1 or plain bitstream)."""
    parsed = data if isinstance(data, fmt.Bitstream) else fmt.parse(data, max_pixels=None)
    extension = parsed.extension(fmt.EXTENSION_CORRDIFF)
    return None if extension is None else CorrectionCoefficients.from_extension(extension)


def corrdiff_decode(decoder: CorrDiffDecoder, codec, headers: Sequence, symbols: Sequence,
                    coefficients: Sequence[CorrectionCoefficients], perception: float = TRANSMITTED_PERCEPTION,
                    x_hat: Sequence[Tensor] | None = None) -> tuple[Tensor, ...]:
    """Decoder side: ``LearnedCodec.decode_symbols`` results (one latent shape) -> images (3, h, w) in [0, 1]."""
    return decode_with_corrections(decoder, decoded_batch(codec, headers, symbols, x_hat), coefficients, perception)


# -- checkpoints (the refiner's conventions: weights-only dict, digest over config/codecs/tensors) ------


def corrdiff_checkpoint(decoder: CorrDiffDecoder, provenance: dict[str, Any]) -> dict[str, Any]:
    """The weights-only dict a decoder is saved as (``provenance`` is stored, not hashed)."""
    return weights_checkpoint(CORRDIFF_FORMAT, decoder.config.to_dict(), [decoder.codec], decoder, provenance)


def save_corrdiff(decoder: CorrDiffDecoder, path: str | Path, provenance: dict[str, Any]) -> str:
    """Save atomically; returns (and sets ``decoder.sha256`` to) the decoder's digest."""
    checkpoint = corrdiff_checkpoint(decoder, provenance)
    decoder.sha256, decoder.provenance = write_checkpoint(checkpoint, path), checkpoint["provenance"]
    return decoder.sha256


def load_corrdiff(path: str | Path, device: torch.device | str = "cpu", expected_sha256: str | None = None,
                  codec_sha256: str | None = None) -> CorrDiffDecoder:
    """A decoder in eval mode on ``device``; refuses a digest other than ``expected_sha256`` and,
    when ``codec_sha256`` is given, a codec it was not trained for."""
    ref = resolve_model(path, "corrdiff")
    checkpoint = read_weights_checkpoint(ref.checkpoint, CORRDIFF_FORMAT, CorrDiffError, "CorrDiff")
    sha256 = decoder_digest(checkpoint)
    expected_sha256 = expected_sha256 or ref.expected_sha256
    if expected_sha256 is not None and sha256 != expected_sha256:
        raise CorrDiffError(f"{path} has CorrDiff SHA-256 {sha256}, but {expected_sha256} was expected")
    (codec,) = checkpoint["codecs"]
    decoder = CorrDiffDecoder(CorrDiffConfig.from_dict(checkpoint["config"]), TrainedCodec(**codec))
    decoder.load_state_dict(checkpoint["state_dict"])
    decoder.sha256, decoder.provenance = sha256, checkpoint.get("provenance", {})
    decoder.eval().requires_grad_(False).to(device)
    if codec_sha256 is not None:
        decoder.check_codec(codec_sha256)
    return decoder
