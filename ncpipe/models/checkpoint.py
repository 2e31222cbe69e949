"""Released codec checkpoints: what they hold, their identity, and loading them safely.

A released checkpoint is a plain dict saved with ``torch.save`` and loaded with
``weights_only=True`` (no pickled code runs on load)::

    format           "ncpipe-codec/1"
    arch, hparams    architecture name and constructor arguments
    rate             {"lambda": λ} — the rate parameter written into every bitstream
    state_dict       CompressAI state dict *after* update(): it holds the quantized CDF
                     tables, so every machine codes with the same integers
    hyper_frac_bits  fixed-point weight precision per h_s conv (ncpipe.entropy.integer_net)
    provenance       how it was made (training config, steps, data, hardware); not hashed

The model's identity is :func:`model_digest`: a SHA-256 over everything that affects
coding (format, arch, hparams, rate, every tensor's name/dtype/shape/bytes, frac bits),
independent of how the file was serialised. Bitstreams carry it; decoders refuse a
bitstream whose digest differs from the loaded model's.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ncpipe.entropy.integer_net import IntegerHyperSynthesis, choose_weight_frac_bits, to_fixed
from ncpipe.entropy.tables import CdfTables, TableError
from ncpipe.errors import NcpipeError
from ncpipe.models.architectures import HyperpriorAdapter, architecture

CHECKPOINT_FORMAT = "ncpipe-codec/1"
_HASHED_FIELDS = ("format", "arch", "hparams", "rate", "hyper_frac_bits")


class CheckpointError(NcpipeError, ValueError):
    """A checkpoint is missing, malformed, or not the one that was asked for."""


@dataclass(frozen=True)
class ModelIdentity:
    arch: str
    sha256: str
    rate: float  # float32-exact λ, as written into bitstreams
    hparams: dict[str, int]

    @property
    def short(self) -> str:
        return f"{self.arch}@{self.sha256[:12]}"


def model_digest(checkpoint: dict[str, Any]) -> str:
    """SHA-256 of the coding-relevant content of a checkpoint dict (see module docstring)."""
    digest = hashlib.sha256()
    meta = {key: checkpoint[key] for key in _HASHED_FIELDS}
    digest.update(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(checkpoint["state_dict"]):
        tensor = checkpoint["state_dict"][name].detach().cpu().contiguous()
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
    adapter: HyperpriorAdapter, lmbda: float, provenance: dict[str, Any]
) -> dict[str, Any]:
    """Freeze a trained model: compute its entropy tables once and fix h_s's precision."""
    model = adapter.model.cpu().eval()
    model.update(force=True)
    return {
        "format": CHECKPOINT_FORMAT,
        "arch": adapter.spec.name,
        "hparams": dict(_hparams_of(adapter)),
        "rate": {"lambda": float(np.float32(lmbda))},
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "hyper_frac_bits": list(choose_weight_frac_bits(adapter.hyper_synthesis_layers())),
        "provenance": provenance,
    }


def _hparams_of(adapter: HyperpriorAdapter) -> dict[str, int]:
    return {"N": adapter.hyper_channels, "M": adapter.latent_channels}


def save_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> str:
    """Save atomically; returns the model digest."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)
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
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an {CHECKPOINT_FORMAT} checkpoint")
    return checkpoint


class CodecModel:
    """A loaded model, ready to code: float transforms plus the exact integer entropy path."""

    def __init__(self, checkpoint: dict[str, Any], sha256: str):
        spec = architecture(checkpoint["arch"])
        self.adapter = HyperpriorAdapter(spec, spec.build(**checkpoint["hparams"]))
        self.adapter.model.load_state_dict(checkpoint["state_dict"])
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
        self.scale_table_fixed = to_fixed(model.gaussian_conditional.scale_table)
        self.hyper = IntegerHyperSynthesis(self.adapter.hyper_synthesis_layers(), tuple(checkpoint["hyper_frac_bits"]))
        self.device = torch.device("cpu")

    def to(self, device: torch.device | str) -> "CodecModel":
        self.device = torch.device(device)
        self.adapter.model.to(self.device)
        self.hyper.to(self.device)
        self.z_medians = self.z_medians.to(self.device)
        self.z_median_fixed = self.z_median_fixed.to(self.device)
        self.scale_table_fixed = self.scale_table_fixed.to(self.device)
        return self


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
