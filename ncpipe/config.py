"""Typed, frozen job configurations, and loading them from mappings (CLI or YAML) with
errors that name the bad field."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

from ncpipe.bitstream import MAX_CORRECTION_STEPS, MAX_QUALITY
from ncpipe.errors import NcpipeError
from ncpipe.images import DEFAULT_MAX_PIXELS, DEFAULT_PNG_LEVEL, DEFAULT_RESTORE_QUALITY

DEFAULT_MODEL = "mbt2018-mean-vbr-small"  # the variable-rate codec: `--quality` picks the rate
RESTORE_CHOICES = ("original", "png", "webp-lossless")  # DecompressConfig.image_format
# Where a job's worker runs: "ray", actors on a Ray cluster (embedded or joined); "in-process", one
# worker in the job's own process (no Ray); "auto", in-process for a job of one worker on this
# machine (no --address, --workers 1 or unset, at most one GPU), else Ray.
IN_PROCESS = "in-process"
EXECUTORS = ("auto", "ray", IN_PROCESS)


class ConfigError(NcpipeError, ValueError):
    """A configuration field is missing, unknown, of the wrong type or out of range."""


@dataclass(frozen=True)
class ClusterConfig:
    """Where and how wide a job runs on Ray."""

    address: str | None = None  # None: start an embedded local Ray bound to loopback
    workers: int | None = None  # codec actors; None: one per GPU, or one on a CPU-only cluster
    cpus_per_worker: float | None = None  # None: every CPU of a CPU-only node / 4 per GPU worker
    max_shard_attempts: int = 3  # a shard whose worker dies is retried this many times in all
    executor: str = "auto"  # see EXECUTORS

    def __post_init__(self) -> None:
        _positive(self, "workers", allow_none=True)
        _positive(self, "cpus_per_worker", allow_none=True)
        _positive(self, "max_shard_attempts")
        if self.executor not in EXECUTORS:
            raise ConfigError(f"executor: must be one of {', '.join(EXECUTORS)}, got {self.executor!r}")
        if self.executor == IN_PROCESS and (self.address or (self.workers or 1) > 1):
            raise ConfigError("executor: in-process runs one worker on this machine; "
                              "--address and --workers above 1 need --executor ray (or auto)")


@dataclass(frozen=True, kw_only=True)
class CodingOptions:
    """How a job's workers code images: the settings compress and recompress share."""

    batch_size: int = 8
    device: str = "auto"
    metrics: bool = True  # PSNR / MS-SSIM per sample (costs one synthesis per image)
    max_pixels: int = DEFAULT_MAX_PIXELS
    y_chunk_channels: int = 32
    coder_threads: int | None = None  # entropy-coding threads per worker; None: its CPUs
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_pixels", "y_chunk_channels"):
            _positive(self, name)
        _positive(self, "coder_threads", allow_none=True)

    def coding_options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(CodingOptions)}


@dataclass(frozen=True)
class CompressConfig(CodingOptions):
    inputs: tuple[str, ...]
    output: str
    model: str = DEFAULT_MODEL  # registry name or checkpoint path
    quality: int | None = None  # quality level of a variable-rate model, 1..n; None: the model's default
    overwrite: bool = False
    # CorrDiff: a decoder checkpoint whose correction coefficients the encoder computes and writes
    # into each bitstream (version 2); steps K and bits b default to the decoder's own.
    corrdiff: str | None = None
    corrdiff_steps: int | None = None
    corrdiff_bits: int | None = None

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ConfigError("inputs: at least one shard URL, pattern or directory is required")
        if not self.output:
            raise ConfigError("output: an output location is required")
        super().__post_init__()
        _in_range(self, "quality", 1, MAX_QUALITY, allow_none=True)
        _in_range(self, "corrdiff_steps", 1, MAX_CORRECTION_STEPS, allow_none=True)
        _in_range(self, "corrdiff_bits", 1, 8, allow_none=True)
        for name in ("corrdiff_steps", "corrdiff_bits"):
            if getattr(self, name) is not None and not self.corrdiff:
                raise ConfigError(f"{name}: only applies with corrdiff (the CorrDiff decoder checkpoint)")

    def coding_fingerprint(self, model_sha256: str, corrdiff_sha256: str | None = None) -> str:
        """What must match for a committed shard to count as done on resume."""
        relevant = {
            "model_sha256": model_sha256,
            "metrics": self.metrics,
            "max_pixels": self.max_pixels,
            "y_chunk_channels": self.y_chunk_channels,
        }
        if self.corrdiff:  # only then, so jobs without CorrDiff keep the fingerprints they had
            relevant["corrdiff"] = {"sha256": corrdiff_sha256, "steps": self.corrdiff_steps, "bits": self.corrdiff_bits}
        if self.quality is not None:  # likewise for jobs at the model's default quality
            relevant["quality"] = self.quality
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RecompressConfig(CodingOptions):
    archive: str
    model: str  # the target model: registry name or checkpoint path
    quality: int | None = None  # the target model's quality level to re-encode at; None: its default
    older_than_model: str | None = None  # policy: samples coded by a model released before this one
    min_psnr: float | None = None  # policy: samples below this PSNR (dB)
    max_bpp: float | None = None  # policy: samples above this bpp
    quality_above: int | None = None  # policy: samples coded at a quality level above this one
    originals: str | None = None  # prefix holding the original shards (default: the recorded URLs)
    transcode_only: bool = False  # never read originals; decode the old bitstreams instead
    decode_models: tuple[str, ...] = ()  # old models for transcoding that are not in the registry
    dry_run: bool = False

    def __post_init__(self) -> None:
        if not self.archive or not self.model:
            raise ConfigError("archive and model are required")
        super().__post_init__()
        for name in ("min_psnr", "max_bpp"):
            _positive(self, name, allow_none=True)
        _in_range(self, "quality", 1, MAX_QUALITY, allow_none=True)
        _in_range(self, "quality_above", 0, MAX_QUALITY, allow_none=True)

    def compress_config(self) -> CompressConfig:
        """The settings the shard workers encode with."""
        return CompressConfig(inputs=(self.archive,), output=self.archive, model=self.model, quality=self.quality,
                              **self.coding_options())


@dataclass(frozen=True)
class DecompressConfig:
    inputs: tuple[str, ...]  # an archive root, a generation directory, or bitstream shards
    output: str
    model: str | None = None  # None: the model the archive's manifest names
    to: str = "shards"  # "shards" (WebDataset tars) or "directory" (files)
    # "original": each image in its source's format and extension (from the archive's manifest;
    # PNG where there is none); "png" or "webp-lossless": every image in that format
    image_format: str = "original"
    jpeg_quality: int = DEFAULT_RESTORE_QUALITY  # quality of JPEG and lossy WebP restores, 1..100
    png_level: int = DEFAULT_PNG_LEVEL  # zlib level of PNG restores, 0..9: 1 favours speed, 9 size
    refiner: str | None = None  # an NC-Diffusion refiner checkpoint applied after the codec's synthesis
    refine_steps: int = 4
    guidance: float = 0.0  # zero-shot sample-guided enhancement strength S (0: off)
    decoder: str = "codec"  # "codec" (the end-to-end decoder) or "corrdiff" (needs corrdiff)
    corrdiff: str | None = None  # the CorrDiff decoder checkpoint the archive was compressed for
    perception: float = 0.5  # CorrDiff's knob p: 0 = the codec's x̂, 0.5 = as transmitted, 1 = pure diffusion
    batch_size: int = 8
    device: str = "auto"
    overwrite: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ConfigError("inputs: an archive or bitstream shards are required")
        if self.to not in ("shards", "directory"):
            raise ConfigError(f"to: must be 'shards' or 'directory', not {self.to!r}")
        if self.image_format not in RESTORE_CHOICES:
            raise ConfigError(f"image_format: must be one of {', '.join(RESTORE_CHOICES)}, not {self.image_format!r}")
        _in_range(self, "jpeg_quality", 1, 100)
        _in_range(self, "png_level", 0, 9)
        if not 0.0 <= self.guidance <= 2.0:
            raise ConfigError(f"guidance: must be in [0, 2], got {self.guidance!r}")
        self._check_corrdiff()
        _positive(self, "refine_steps")
        _positive(self, "batch_size")
        _positive(self, "max_pixels")

    def _check_corrdiff(self) -> None:
        if self.decoder not in ("codec", "corrdiff"):
            raise ConfigError(f"decoder: must be 'codec' or 'corrdiff', not {self.decoder!r}")
        _in_range(self, "perception", 0.0, 1.0)
        if self.decoder == "corrdiff" and not self.corrdiff:
            raise ConfigError("corrdiff: decoder 'corrdiff' needs the CorrDiff decoder checkpoint (--corrdiff PATH)")
        if self.corrdiff and self.decoder != "corrdiff":
            raise ConfigError("decoder: a CorrDiff checkpoint was given; set decoder to 'corrdiff' to decode with it")
        if self.decoder == "corrdiff" and self.refiner:
            raise ConfigError("refiner: the NC-Diffusion refiner and the CorrDiff decoder are alternatives; pick one")


def _positive(config: Any, name: str, allow_none: bool = False) -> None:
    value = getattr(config, name)
    if value is None and allow_none:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name}: must be a positive number, got {value!r}")


def _in_range(config: Any, name: str, low: float, high: float, allow_none: bool = False) -> None:
    value = getattr(config, name)
    if value is None and allow_none:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise ConfigError(f"{name}: must be in [{low:g}, {high:g}], got {value!r}")


def config_from_mapping(cls: type, mapping: Mapping[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, checking every field's name and type."""
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(mapping).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for name, raw in mapping.items():
        path = f"{where}.{name}" if where else name
        if name not in known:
            guess = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {guess[0]!r}?)" if guess else ""
            raise ConfigError(f"{path}: unknown field{hint}; known fields: {', '.join(known)}")
        values[name] = _coerce(hints[name], raw, path)
    missing = [
        n for n, f in known.items()
        if n not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where or cls.__name__}: missing required field(s) {', '.join(missing)}")
    try:
        return cls(**values)
    except ConfigError as err:
        raise ConfigError(f"{where}.{err}" if where else str(err)) from None


def _coerce(hint: Any, value: Any, path: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, path)
    if dataclasses.is_dataclass(hint):
        return config_from_mapping(hint, value, path)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return {_coerce(args[0], k, path): _coerce(args[1], v, f"{path}.{k}") for k, v in value.items()}
    if origin is tuple:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        return tuple(_coerce(args[0], item, f"{path}[{i}]") for i, item in enumerate(items))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise ConfigError(f"{path}: expected {hint.__name__}, got {value!r}")
    return value
