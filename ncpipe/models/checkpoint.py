"""Released codec checkpoints: what they hold, their identity, and loading them safely.

A released checkpoint is a plain dict saved with ``torch.save`` and loaded with
``weights_only=True`` (no pickled code runs on load)::

    format           "ncpipe-codec/2" ("ncpipe-codec/1" is still read)
    arch, hparams    architecture name and constructor arguments
    rate             {"lambda": λ} — the rate parameter (of the default quality)
    quality          variable-rate models only: {"lambdas": [λ_1..λ_n], "default": q}
    quality_steps    variable-rate models only: float32 (n, M), the quantization step of
                     every quality level and latent channel (ncpipe.models.architectures)
    state_dict       CompressAI state dict *after* update(): it holds the quantized CDF
                     tables, so every machine codes with the same integers. Format 2 stores
                     the transforms g_a, h_a, g_s in float16 (half the bytes; they only move
                     the reconstruction) and everything that sets entropy parameters in float32
    hyper_frac_bits  fixed-point weight precision per h_s conv (ncpipe.entropy.integer_net)
    provenance       how it was made (training config, steps, data, hardware); not hashed

The model's identity is :func:`model_digest`: a SHA-256 over everything that affects
coding (format, arch, hparams, rate, quality, every tensor's name/dtype/shape/bytes, frac
bits), independent of how the file was serialised. Bitstreams carry it; decoders refuse a
bitstream whose digest differs from the loaded model's.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ncpipe.entropy.integer_net import IntegerHyperSynthesis, choose_weight_frac_bits, to_fixed
from ncpipe.entropy.tables import CdfTables, TableError
from ncpipe.errors import NcpipeError
from ncpipe.io.storage import write_bytes_atomic
from ncpipe.models.architectures import HyperpriorAdapter, architecture

CHECKPOINT_FORMAT = "ncpipe-codec/2"
READABLE_FORMATS = ("ncpipe-codec/1", CHECKPOINT_FORMAT)
HALF_PRECISION_PREFIXES = ("g_a.", "h_a.", "g_s.")  # the transforms, stored in float16 by format 2
_HASHED_FIELDS = ("format", "arch", "hparams", "rate", "hyper_frac_bits")


class CheckpointError(NcpipeError, ValueError):
    """A checkpoint is missing, malformed, or not the one that was asked for."""


@dataclass(frozen=True)
class ModelIdentity:
    arch: str
    sha256: str
    rate: float  # float32-exact λ (of the default quality for a variable-rate model)
    hparams: dict[str, int]

    @property
    def short(self) -> str:
        return f"{self.arch}@{self.sha256[:12]}"


def model_digest(checkpoint: dict[str, Any]) -> str:
    """SHA-256 of the coding-relevant content of a checkpoint dict (see module docstring)."""
    digest = hashlib.sha256()
    meta = {key: checkpoint[key] for key in _HASHED_FIELDS}
    if "quality" in checkpoint:  # only then, so fixed-rate checkpoints keep their digests
        meta["quality"] = checkpoint["quality"]
    digest.update(json.dumps(meta, sort_keys=True).encode())
    tensors = dict(checkpoint["state_dict"])
    if "quality_steps" in checkpoint:
        tensors["quality_steps"] = checkpoint["quality_steps"]
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def release_checkpoint(
    adapter: HyperpriorAdapter, lambdas: Sequence[float], provenance: dict[str, Any],
    default_quality: int | None = None, half_precision: bool = True,
) -> dict[str, Any]:
    """Freeze a trained model: compute its entropy tables once, fix h_s's precision, store the
    transforms in half precision (``half_precision=False`` keeps float32, to measure what that
    costs: benchmarks/half_precision.py) and, for a variable-rate model, its quality steps."""
    model = adapter.model.cpu().eval()
    model.update(force=True)
    lambdas = [float(np.float32(v)) for v in lambdas]
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "arch": adapter.spec.name,
        "hparams": dict(_hparams_of(adapter)),
        "rate": {"lambda": lambdas[0]},
        "state_dict": {k: _stored(k, v, half_precision) for k, v in model.state_dict().items()},
        "hyper_frac_bits": list(choose_weight_frac_bits(adapter.hyper_synthesis_layers())),
        "provenance": provenance,
    }
    if adapter.quality is None:
        if len(lambdas) != 1:
            raise CheckpointError(f"a fixed-rate model has one λ, not {len(lambdas)}")
        return checkpoint
    if len(lambdas) != adapter.quality.levels:
        raise CheckpointError(f"the model has {adapter.quality.levels} quality levels, {len(lambdas)} λ were given")
    default = default_quality or (len(lambdas) + 1) // 2
    if not 1 <= default <= len(lambdas):
        raise CheckpointError(f"default quality {default} is outside 1..{len(lambdas)}")
    checkpoint["rate"] = {"lambda": lambdas[default - 1]}
    checkpoint["quality"] = {"lambdas": lambdas, "default": default}
    # exp() runs here, once, on the CPU: decoders read the stored float32 steps, never recompute them.
    checkpoint["quality_steps"] = adapter.quality.log_steps.detach().cpu().double().exp().float().clone()
    return checkpoint


def _stored(name: str, tensor: torch.Tensor, half_precision: bool) -> torch.Tensor:
    tensor = tensor.detach().cpu().clone()
    half = half_precision and name.startswith(HALF_PRECISION_PREFIXES) and tensor.is_floating_point()
    return tensor.half() if half else tensor


def _hparams_of(adapter: HyperpriorAdapter) -> dict[str, int]:
    return {"N": adapter.hyper_channels, "M": adapter.latent_channels}


def save_torch(obj: Any, path: str | Path) -> None:
    """``torch.save`` whose file appears whole or not at all (ncpipe.io.storage's atomic write)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes_atomic(str(path), buffer.getvalue())


def save_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> str:
    """Save atomically; returns the model digest."""
    save_torch(checkpoint, path)
    return model_digest(checkpoint)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load the dict (weights only) and check its format; no model is built."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad file; all mean "unreadable"
        raise CheckpointError(f"{path} is not a loadable weights-only checkpoint: {err}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") not in READABLE_FORMATS:
        raise CheckpointError(f"{path} is not an ncpipe codec checkpoint (format {' or '.join(READABLE_FORMATS)})")
    return checkpoint


class CodecModel:
    """A loaded model, ready to code: float transforms plus the exact integer entropy path."""

    def __init__(self, checkpoint: dict[str, Any], sha256: str):
        spec = architecture(checkpoint["arch"])
        self.adapter = HyperpriorAdapter(spec, spec.build(**checkpoint["hparams"]))
        self.adapter.model.load_state_dict(checkpoint["state_dict"])  # float16 transforms become float32
        self.adapter.model.eval().requires_grad_(False)
        self.identity = ModelIdentity(
            spec.name, sha256, float(np.float32(checkpoint["rate"]["lambda"])), dict(checkpoint["hparams"])
        )
        self.provenance = checkpoint.get("provenance", {})
        model = self.adapter.model
        try:
            self.z_tables = CdfTables.from_tensors(
                model.entropy_bottleneck._quantized_cdf,
                model.entropy_bottleneck._cdf_length,
                model.entropy_bottleneck._offset,
            )
            self.y_tables = CdfTables.from_tensors(
                model.gaussian_conditional._quantized_cdf,
                model.gaussian_conditional._cdf_length,
                model.gaussian_conditional._offset,
            )
        except TableError as err:
            raise CheckpointError(f"entropy tables of {self.identity.short} are invalid: {err}") from None
        self.z_medians = model.entropy_bottleneck.quantiles[:, 0, 1].detach().clone()
        self.z_median_fixed = to_fixed(self.z_medians)
        self.hyper = IntegerHyperSynthesis(self.adapter.hyper_synthesis_layers(), tuple(checkpoint["hyper_frac_bits"]))
        self.quality = _quality_levels(checkpoint, self.adapter.latent_channels)
        # Scale-table thresholds per quality level (row 0: fixed-rate, step 1), in exact fixed point:
        # a latent's table index is the number of thresholds of its channel below its scale.
        steps = torch.ones(1, self.adapter.latent_channels, dtype=torch.float32)
        if self.quality is not None:
            steps = torch.cat([steps, self.quality.steps])
        table = model.gaussian_conditional.scale_table[:-1].float().double()
        self.thresholds_fixed = to_fixed(steps.double()[:, :, None] * table)  # float32·float32 is exact in float64
        self.steps = steps.double()
        self.to("cpu")  # where it was loaded, in that device's layout

    @property
    def variable_rate(self) -> bool:
        return self.quality is not None

    def check_quality(self, quality: int) -> None:
        """Raise unless ``quality`` (0 for a fixed-rate model) is one this model codes at."""
        check_quality_level(quality, len(self.quality.lambdas) if self.quality else None, self.identity.short)

    def rate_of(self, quality: int) -> float:
        """λ of a quality level (the model's own λ for a fixed-rate model, quality 0)."""
        self.check_quality(quality)
        return self.quality.lambdas[quality - 1] if quality else self.identity.rate

    def to(self, device: torch.device | str) -> "CodecModel":
        self.device = torch.device(device)
        self.adapter.model.to(self.device)
        # channels-last measured faster on CPUs only; CUDA keeps the layout its kernels were measured with
        self.adapter.set_channels_last(self.device.type == "cpu")
        self.hyper.to(self.device)
        self.z_medians = self.z_medians.to(self.device)
        self.z_median_fixed = self.z_median_fixed.to(self.device)
        self.thresholds_fixed = self.thresholds_fixed.to(self.device)
        self.steps = self.steps.to(self.device)
        return self


class QualityError(CheckpointError):
    """A quality level the model does not have."""


@dataclass(frozen=True)
class QualityLevels:
    """A variable-rate model's levels: quality q (1..n) codes with λ_q and steps Δ_q."""

    lambdas: tuple[float, ...]
    default: int
    steps: torch.Tensor  # float32 (n, M)


def check_quality_level(quality: int, levels: int | None, model: str) -> None:
    """Raise unless ``quality`` (0 for a fixed-rate model) is a level of a model with ``levels`` quality
    levels (None: a fixed-rate model); ``model`` names it in the message."""
    if levels is None:
        if quality != 0:
            raise QualityError(f"{model} is a fixed-rate model: it has no quality {quality}")
    elif not 1 <= quality <= levels:
        raise QualityError(f"quality {quality} is outside 1..{levels} of {model}")


def _quality_levels(checkpoint: dict[str, Any], channels: int) -> QualityLevels | None:
    quality = checkpoint.get("quality")
    if quality is None:
        return None
    steps = checkpoint["quality_steps"]
    lambdas = tuple(float(v) for v in quality["lambdas"])
    if steps.dtype != torch.float32 or tuple(steps.shape) != (len(lambdas), channels):
        raise CheckpointError(f"quality_steps must be float32 ({len(lambdas)}, {channels}), "
                              f"not {steps.dtype} {tuple(steps.shape)}")
    if not bool(torch.isfinite(steps).all()) or bool((steps <= 0).any()):
        raise CheckpointError("quality_steps must be positive and finite")
    return QualityLevels(lambdas, int(quality["default"]), steps)


def load_codec_model(path: str | Path, expected_sha256: str | None = None) -> CodecModel:
    """Load a released checkpoint; refuse it if its digest is not ``expected_sha256``."""
    checkpoint = read_checkpoint(path)
    sha256 = model_digest(checkpoint)
    if expected_sha256 is not None and sha256 != expected_sha256:
        raise CheckpointError(
            f"{path} has model SHA-256 {sha256}, but {expected_sha256} was expected: "
            "the file was changed or is a different model"
        )
    return CodecModel(checkpoint, sha256)
