"""The NC-Diffusion refiner: a conditional U-Net that improves a codec's reconstruction x̂ at the decoder.

::

    bitstream ─decode_symbols─> (header, symbols) ─synthesise─> x̂ (3,h,w) [0,1]
                                        │                          │
                  entropy_parameters ─> ŷ = y_sym + μ              │
                                        ▼                          ▼
                                   DecodedBatch (x̂, ŷ, sizes, λ, codec SHA-256, keys)
                                        │
    Refiner.refine:  x̂ ─replicate-pad to the codec canvas (Hp,Wp)─> [-1,1] ─┐
                     cond = [x̂ | up16(conv1x1(ŷ))]   cond_vector = [log λ] ─┤ (each optional)
                     sample_bridge from x_T = x̂  (K steps, η schedule, guidance hook)
                     x̂ + ½(x_0 − x̂)  ─crop to (h,w), clamp─> refined (3,h,w) [0,1]

The bridge process is x_t = x0 + η_t (x̂ − x0) [+ κ sqrt(η_t) ε] (``schedules.bridge_forward``), the
denoiser ``Denoiser(UNet)`` predicts x0 (residual parameterisation by default: x0_hat = x_t + F), and
sampling starts at x̂ itself, so with κ = 0 the output is a deterministic function of the bitstream.
``process="gaussian"`` turns the same class into the CDC-style baseline: x0-parameterised, DDIM from
Gaussian noise drawn per image from its key (``seeded_noise``), conditioned on the same x̂.

A refiner is trained for one or more codec checkpoints (one per rate point; ``rate_conditioning``
feeds log λ so one network serves them all) and refuses any other codec: its checkpoint stores the
SHA-256 of every codec it was trained for.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ncpipe.bitstream import LATENT_STRIDE
from ncpipe.diffusion.guidance import GuidanceConfig, SampleGuidance
from ncpipe.diffusion.objectives import (
    TrainingBatch,
    bridge_training_batch,
    continuous_bridge_training_batch,
    gaussian_training_batch,
)
from ncpipe.diffusion.samplers import Denoise, Guidance, sample_bridge, sample_ddim, seeded_noise
from ncpipe.diffusion.schedules import EtaKind, bridge_step, continuous_eta, ddim_timesteps, eta_schedule
from ncpipe.diffusion.unet import Denoiser, Parameterization, UNet, UNetConfig, to_model_range
from ncpipe.errors import NcpipeError
from ncpipe.models.checkpoint import save_torch
from ncpipe.models.registry import resolve_model

REFINER_FORMAT = "ncpipe-refiner/1"
Process = Literal["bridge", "gaussian"]
TrainLevels = Literal["discrete", "continuous"]
_HASHED_FIELDS = ("format", "config", "codecs")


class RefinerError(NcpipeError, ValueError):
    """A refiner checkpoint is missing, malformed, or not the one asked for."""


class RefinerMismatchError(RefinerError):
    """The refiner was trained for other codec checkpoints than the one decoding."""


@dataclass(frozen=True)
class RefinerConfig:
    """Everything that defines a refiner network and how it samples (stored in its checkpoint).

    ``unet.cond_channels`` and ``unet.cond_vector_dim`` are derived (3 + ``latent_features`` and
    1 if ``rate_conditioning``) and overwritten here. ``train_levels``: "continuous" draws η from
    the whole range of the schedule family (``schedules.continuous_eta``), so every K is in
    distribution; "discrete" draws it from the ``train_schedule_steps``-step schedule only. Sampling
    with K steps uses the K-step schedule of the same kind, and the network's time input is η itself.
    """

    unet: UNetConfig = UNetConfig()
    process: Process = "bridge"
    parameterization: Parameterization = "residual"
    schedule: EtaKind = "geometric"
    eta_min: float = 0.05
    eta_power: float = 1.0
    train_schedule_steps: int = 4
    train_levels: TrainLevels = "discrete"  # what released refiners without this field were trained on
    kappa: float = 0.0
    rate_conditioning: bool = False
    latent_features: int = 0  # channels of the projected ŷ features; 0 = no latent conditioning
    latent_channels: int = 0  # M of the codec (needed when latent_features > 0)
    clip_x0: bool = True

    def __post_init__(self) -> None:
        if self.process not in ("bridge", "gaussian"):
            raise ValueError(f"process must be 'bridge' or 'gaussian', got {self.process!r}")
        if self.latent_features < 0 or (self.latent_features > 0 and self.latent_channels < 1):
            raise ValueError("latent_features > 0 needs latent_channels, the codec's M")
        if self.kappa < 0.0 or (self.process == "gaussian" and self.kappa > 0.0):
            raise ValueError("kappa must be >= 0, and is a bridge option only")
        if self.train_schedule_steps < 1:
            raise ValueError("train_schedule_steps must be >= 1")
        if self.train_levels not in ("discrete", "continuous"):
            raise ValueError(f"train_levels must be 'discrete' or 'continuous', got {self.train_levels!r}")
        eta_schedule(max(self.train_schedule_steps, 2), self.schedule, self.eta_min, self.eta_power)  # validates
        unet = dataclasses.replace(
            self.unet, in_channels=3, cond_channels=3 + self.latent_features,
            cond_vector_dim=1 if self.rate_conditioning else 0,
        )
        object.__setattr__(self, "unet", unet)

    def etas(self, steps: int) -> Tensor:
        """η_0 = 0 < … < η_K = 1 of a K-step bridge sampler (or of training with K = T)."""
        return eta_schedule(steps, self.schedule, self.eta_min, self.eta_power)

    def training_batch(self, x0: Tensor, x_hat: Tensor, generator: torch.Generator | None) -> TrainingBatch:
        """One training batch of this refiner's process and levels (model range in and out)."""
        if self.process == "gaussian":
            return gaussian_training_batch(x0, generator)
        if self.train_levels == "continuous":
            def eta_of(u: Tensor) -> Tensor:
                return continuous_eta(u, self.schedule, self.eta_min, self.eta_power)

            return continuous_bridge_training_batch(x0, x_hat, eta_of, generator, self.kappa)
        return bridge_training_batch(x0, x_hat, self.etas(self.train_schedule_steps), generator, self.kappa)

    def to_dict(self) -> dict[str, Any]:
        return jsonable(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RefinerConfig":
        return cls(**{**data, "unet": UNetConfig.from_dict(data["unet"])})


@dataclass(frozen=True)
class TrainedCodec:
    """A codec checkpoint a refiner was trained for."""

    sha256: str
    arch: str
    rate: float  # λ


@dataclass(frozen=True)
class DecodedBatch:
    """What the decoder holds for images sharing one latent shape: the refiner's input.

    Build it with :func:`decoded_batch` right after ``LearnedCodec.synthesise``.
    """

    x_hat: tuple[Tensor, ...]  # (3, h, w) in [0, 1] each: LearnedCodec.synthesise's output
    y_hat: Tensor  # (B, M, hy, wy) float32, ŷ = y_sym + μ, exactly what g_s got
    sizes: tuple[tuple[int, int], ...]  # (h, w) per image
    padded: tuple[int, int]  # the codec's padded size (Hp, Wp) = 16·(hy, wy), shared by the batch
    rates: tuple[float, ...]  # λ per image (from the header)
    codec_sha256: tuple[str, ...]  # the model each bitstream names
    keys: tuple[str, ...]  # per-image noise seeds (default: a digest of the image's symbols)
    qualities: tuple[int, ...] | None = None  # quality level per image (from the header); None: fixed-rate (Δ = 1)

    def __post_init__(self) -> None:
        n = len(self.x_hat)
        lengths = {len(v) for v in (self.sizes, self.rates, self.codec_sha256, self.keys)} | {self.y_hat.shape[0]}
        if self.qualities is not None:
            lengths.add(len(self.qualities))
        if not n or lengths != {n}:
            raise ValueError("a DecodedBatch needs one x̂, ŷ, size, rate, codec and key per image (and at least one)")


def bin_steps(codec, decoded: DecodedBatch) -> Tensor:
    """The quantization steps Δ (B, M, 1, 1) float32 the bitstreams of ``decoded`` were coded with.

    Each image's quality level selects its per-channel steps; a fixed-rate codec has Δ = 1.
    """
    if decoded.qualities is None:
        if codec.model.quality is not None:
            raise ValueError("a variable-rate codec's batch must carry each image's quality level")
        return torch.ones(len(decoded.x_hat), codec.model.adapter.latent_channels, 1, 1)
    return codec.steps(decoded.qualities).float()


def symbols_key(z: np.ndarray, y: np.ndarray) -> str:
    """A stable per-image key from its latent symbols: same bitstream content -> same key."""
    digest = hashlib.sha256()
    for array in (z, y):
        array = np.ascontiguousarray(array, dtype=np.int32)
        digest.update(f"{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def decoded_batch(codec, headers: Sequence, symbols: Sequence, x_hat: Sequence[Tensor] | None = None,
                  keys: Sequence[str] | None = None) -> DecodedBatch:
    """A ``DecodedBatch`` from ``LearnedCodec.decode_symbols`` results (one latent shape).

    ``x_hat``: what ``codec.synthesise(headers, symbols)`` returned (computed here when None);
    ŷ is formed as synthesise forms it, from the exact means the symbols carry.
    """
    if x_hat is None:
        x_hat = codec.synthesise(headers, symbols)
    with torch.inference_mode():
        y_hat = codec.latents(headers, symbols)
    padded = {(h.height + h.pad_bottom, h.width + h.pad_right) for h in headers}
    if len(padded) != 1:
        raise ValueError(f"images of one refine batch must share one padded size (latent shape), got {sorted(padded)}")
    return DecodedBatch(
        x_hat=tuple(x_hat), y_hat=y_hat.clone(), sizes=tuple((h.height, h.width) for h in headers),
        padded=padded.pop(), rates=tuple(float(h.rate) for h in headers),
        codec_sha256=tuple(h.model_sha256 for h in headers),
        keys=tuple(keys) if keys is not None else tuple(symbols_key(s.z, s.y) for s in symbols),
        qualities=tuple(h.quality for h in headers),
    )


class Refiner(nn.Module):
    """``Denoiser(UNet)`` plus the conditioning on x̂ (and optionally ŷ features and log λ)."""

    def __init__(self, config: RefinerConfig, codecs: Sequence[TrainedCodec] = ()) -> None:
        super().__init__()
        self.config = config
        self.codecs = tuple(codecs)
        self.denoiser = Denoiser(UNet(config.unet), config.parameterization)
        self.latent_proj = (
            nn.Conv2d(config.latent_channels, config.latent_features, 1) if config.latent_features else None
        )
        self.sha256: str | None = None  # set when saved or loaded
        self.provenance: dict[str, Any] = {}

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- conditioning -------------------------------------------------------------------

    def conditioning(
        self, x_hat_model: Tensor, y_hat: Tensor | None = None, rates: Sequence[float] | Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """(cond (B, 3 [+F], H, W), cond_vector (B, 1) or None) for x̂ on a canvas of size (H, W).

        ŷ features: 1x1 conv M -> F on the latent grid, bilinear upsampling to 16·(hy, wy), then
        cropped or edge-padded to (H, W). Rate: log λ.
        """
        cond = x_hat_model
        if self.latent_proj is not None:
            if y_hat is None:
                raise ValueError("this refiner is conditioned on ŷ; pass y_hat")
            feats = self.latent_proj(y_hat.to(x_hat_model.dtype))
            size = (LATENT_STRIDE * y_hat.shape[-2], LATENT_STRIDE * y_hat.shape[-1])
            feats = F.interpolate(feats, size=size, mode="bilinear", align_corners=False)
            cond = torch.cat([x_hat_model, fit_canvas(feats, x_hat_model.shape[-2:])], dim=1)
        vector = None
        if self.config.rate_conditioning:
            if rates is None:
                raise ValueError("this refiner is rate-conditioned; pass the rates λ")
            lam = torch.as_tensor(rates, dtype=torch.float32).reshape(-1, 1)
            vector = lam.log().to(device=x_hat_model.device, dtype=x_hat_model.dtype)
        return cond, vector

    def forward(self, x_t: Tensor, t: Tensor, x_hat_model: Tensor, y_hat: Tensor | None = None,
                rates: Sequence[float] | Tensor | None = None) -> Tensor:
        """x0_hat (model range) for a training batch; x̂ and ŷ as in ``conditioning``."""
        cond, vector = self.conditioning(x_hat_model, y_hat, rates)
        return self.denoiser(x_t, t, cond, vector)

    # -- codec binding ------------------------------------------------------------------

    def check_codec(self, sha256: str) -> None:
        """Raise ``RefinerMismatchError`` unless this refiner was trained for codec ``sha256``."""
        if any(c.sha256 == sha256 for c in self.codecs):
            return
        from ncpipe.models.registry import describe_sha256

        trained = "; ".join(f"{c.arch} λ={c.rate:g} {describe_sha256(c.sha256)}" for c in self.codecs) or "no codec"
        name = f"refiner {self.sha256[:12]}" if self.sha256 else "this refiner"
        raise RefinerMismatchError(
            f"{name} was trained for {trained}, not for codec {describe_sha256(sha256)}: use the refiner trained "
            "for this codec, or train one with `ncpipe train refiner --codec <this codec>`"
        )

    # -- sampling -----------------------------------------------------------------------

    def refine(
        self, decoded: DecodedBatch, steps: int, guidance: GuidanceConfig | None = None,
        keys: Sequence[str] | None = None, codec=None,
    ) -> tuple[Tensor, ...]:
        """Refined images, (3, h, w) in [0, 1] each, on the refiner's device (as synthesise returns x̂).

        ``steps`` K sampler steps. ``guidance`` needs ``codec`` (the ``LearnedCodec`` that decoded the
        batch) for its g_a. ``keys`` override ``decoded.keys``; they seed the only random numbers
        (Gaussian start, or the κ term), so the output is a function of the bitstream alone. Each
        image is padded and sampled on its own canvas, so a batch gives every image its single-image
        output up to float reduction order (measured within 1e-5).
        """
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        for sha in dict.fromkeys(decoded.codec_sha256):
            self.check_codec(sha)
        keys = tuple(keys) if keys is not None else decoded.keys
        if len(keys) != len(decoded.x_hat):
            raise ValueError(f"{len(keys)} keys for {len(decoded.x_hat)} images")
        with torch.inference_mode(False), torch.no_grad():
            return self._refine(decoded, steps, guidance, keys, codec)

    def _refine(self, decoded: DecodedBatch, steps: int, guidance: GuidanceConfig | None,
                keys: tuple[str, ...], codec) -> tuple[Tensor, ...]:
        device, cfg = self.device, self.config
        canvas = canvas_size(decoded.padded, cfg.unet.size_multiple)
        x_hat01 = torch.cat([fit_canvas(x.to(device).clone()[None].float(), canvas) for x in decoded.x_hat])
        x_hat = to_model_range(x_hat01)
        y_hat = decoded.y_hat.to(device).clone()
        cond, vector = self.conditioning(x_hat, y_hat, decoded.rates)
        denoise = self._denoise_fn(cond, vector)
        hook = self._guidance_hook(guidance, codec, decoded, y_hat, x_hat)
        if cfg.process == "gaussian":
            noise = seeded_noise(keys, x_hat.shape[1:], device, x_hat.dtype)
            out = sample_ddim(denoise, noise, ddim_timesteps(steps), guidance=hook)
        elif cfg.kappa == 0.0:
            out = sample_bridge(denoise, x_hat, cfg.etas(steps), guidance=hook)
        else:
            start = x_hat + cfg.kappa * seeded_noise(keys, x_hat.shape[1:], device, x_hat.dtype)
            out = _sample_bridge_from(denoise, start, x_hat, cfg.etas(steps), cfg.kappa, hook)
        # x̂ + ½(x_0 − x̂) in [0, 1]: exactly x̂ where the refiner changes nothing
        refined = x_hat01 + 0.5 * (out - x_hat)
        return tuple(refined[i, :, :h, :w].clamp(0.0, 1.0) for i, (h, w) in enumerate(decoded.sizes))

    def _denoise_fn(self, cond: Tensor, vector: Tensor | None) -> Denoise:
        bound = self.denoiser.bind(cond, vector)
        if not self.config.clip_x0:
            return bound
        return lambda x_t, t: bound(x_t, t).clamp(-1.0, 1.0)

    def _guidance_hook(self, guidance: GuidanceConfig | None, codec, decoded: DecodedBatch, y_hat: Tensor,
                       x_hat: Tensor) -> Guidance | None:
        if guidance is None or not guidance.enabled:
            return None
        analysis = None
        if guidance.strength > 0.0:
            if codec is None:
                raise ValueError("latent-consistency guidance re-encodes with the codec's g_a: pass codec=")
            if any(sha != codec.model.identity.sha256 for sha in decoded.codec_sha256):
                raise RefinerMismatchError("guidance codec is not the codec that wrote these bitstreams")
            adapter = codec.model.adapter
            analysis = lambda x: adapter.analysis(x)[0]  # noqa: E731  (y; h_a's z is not used)
            steps = bin_steps(codec, decoded).to(y_hat.device)
            return SampleGuidance(guidance, analysis, y_hat, x_hat, decoded.sizes, decoded.padded, steps)
        return SampleGuidance(guidance, analysis, y_hat, x_hat, decoded.sizes, decoded.padded)


def _sample_bridge_from(denoise: Denoise, start: Tensor, x_hat: Tensor, etas: Tensor, kappa: float,
                        guidance: Guidance | None) -> Tensor:
    """``sample_bridge`` from a start other than x̂ (x_T = x̂ + κ ε when κ > 0); same steps."""
    x = start
    for i, k in enumerate(range(len(etas) - 1, 0, -1)):
        t = etas[k].to(device=x.device, dtype=x.dtype).expand(x.shape[0])
        x0_hat = denoise(x, t)
        if guidance is not None:
            x0_hat = guidance(x0_hat, i)
        x = bridge_step(x, x0_hat, x_hat, t, etas[k - 1].to(device=x.device, dtype=x.dtype), kappa)
    return x


def canvas_size(padded: tuple[int, int], multiple: int) -> tuple[int, int]:
    """The sampling canvas: the codec's padded size rounded up to the U-Net's size multiple."""
    return (math.ceil(padded[0] / multiple) * multiple, math.ceil(padded[1] / multiple) * multiple)


def fit_canvas(x: Tensor, size: Sequence[int]) -> Tensor:
    """Crop (B, C, H, W) to ``size`` or extend it by replicating its last row/column."""
    h, w = int(size[0]), int(size[1])
    x = x[..., :h, :w]
    if x.shape[-2] < h or x.shape[-1] < w:
        x = F.pad(x, (0, w - x.shape[-1], 0, h - x.shape[-2]), mode="replicate")
    return x


# -- checkpoints ----------------------------------------------------------------------------


def weights_checkpoint(format_: str, config: dict[str, Any], codecs: Sequence[TrainedCodec], module: nn.Module,
                       provenance: dict[str, Any]) -> dict[str, Any]:
    """The weights-only dict a diffusion network is saved as (``provenance`` is stored, not hashed)."""
    return {
        "format": format_,
        "config": config,
        "codecs": [asdict(c) for c in codecs],
        "state_dict": {k: v.detach().cpu().clone() for k, v in module.state_dict().items()},
        "provenance": jsonable(provenance),
    }


def refiner_checkpoint(refiner: Refiner, provenance: dict[str, Any]) -> dict[str, Any]:
    """The weights-only dict a refiner is saved as."""
    return weights_checkpoint(REFINER_FORMAT, refiner.config.to_dict(), refiner.codecs, refiner, provenance)


def decoder_digest(checkpoint: dict[str, Any]) -> str:
    """SHA-256 of config, codecs and every tensor (name, dtype, shape, bytes), as ``model_digest``."""
    digest = hashlib.sha256()
    digest.update(json.dumps({k: checkpoint[k] for k in _HASHED_FIELDS}, sort_keys=True).encode())
    for name in sorted(checkpoint["state_dict"]):
        tensor = checkpoint["state_dict"][name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def write_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> str:
    """Save atomically (temp + rename); returns the checkpoint's ``decoder_digest``."""
    save_torch(checkpoint, path)
    return decoder_digest(checkpoint)


def save_refiner(refiner: Refiner, path: str | Path, provenance: dict[str, Any]) -> str:
    """Save atomically; returns (and sets ``refiner.sha256`` to) the refiner digest."""
    refiner.sha256 = write_checkpoint(refiner_checkpoint(refiner, provenance), path)
    return refiner.sha256


def read_weights_checkpoint(path: str | Path, format_: str | tuple[str, ...], error: type[Exception],
                            label: str) -> dict[str, Any]:
    """A checkpoint dict of ``format_`` (or of any of several; weights only, no code runs), or ``error``
    saying what is wrong."""
    path = Path(path)
    formats = (format_,) if isinstance(format_, str) else format_
    if not path.is_file():
        raise error(f"{label} checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad file; all mean "unreadable"
        raise error(f"{path} is not a loadable weights-only checkpoint: {err}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") not in formats:
        raise error(f"{path} is not an {' or '.join(formats)} checkpoint")
    return checkpoint


def read_refiner_checkpoint(path: str | Path) -> dict[str, Any]:
    """The refiner checkpoint dict, format-checked."""
    return read_weights_checkpoint(path, REFINER_FORMAT, RefinerError, "refiner")


def load_refiner(path: str | Path, device: torch.device | str = "cpu", expected_sha256: str | None = None,
                 codec_sha256: str | None = None) -> Refiner:
    """A refiner in eval mode on ``device``; refuses a digest other than ``expected_sha256`` and,
    when ``codec_sha256`` is given, a codec it was not trained for."""
    ref = resolve_model(path, "refiner")
    checkpoint = read_refiner_checkpoint(ref.checkpoint)
    sha256 = decoder_digest(checkpoint)
    expected_sha256 = expected_sha256 or ref.expected_sha256
    if expected_sha256 is not None and sha256 != expected_sha256:
        raise RefinerError(f"{path} has refiner SHA-256 {sha256}, but {expected_sha256} was expected")
    refiner = Refiner(RefinerConfig.from_dict(checkpoint["config"]),
                      [TrainedCodec(**c) for c in checkpoint["codecs"]])
    refiner.load_state_dict(checkpoint["state_dict"])
    refiner.sha256 = sha256
    refiner.provenance = checkpoint.get("provenance", {})
    refiner.eval().requires_grad_(False).to(device)
    if codec_sha256 is not None:
        refiner.check_codec(codec_sha256)
    return refiner


def jsonable(value: Any) -> Any:
    """Tuples -> lists, recursively, so a dict hashes the same before saving and after loading."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value
