"""``ncpipe evaluate-refiner``: diffusion refiners against their base codec, at identical bits.

::

    images ─► each codec (rate point): encode once ─► .ncb bytes ─► decode_symbols, synthesise ─► x̂   (row "codec")
                                                                            │
                   each refiner trained for this codec, each K, ± guidance ─┴─► refine ─► x̃           (one row each)
    rows ─► results.parquet / results.csv      one row per image x codec x method x K
         ─► summary.csv / summary.md           mean per codec x method x K, with ΔPSNR to the codec
         ─► psnr_vs_steps[_<codec>].png, decode_time_vs_steps[_<codec>].png

Every method of a codec decodes the *same* bitstream, so bpp is identical by construction. Decode
time is the whole decoder: rANS + entropy parameters + synthesis, plus the refinement for refiner
rows (``refine_seconds`` alone is also kept). ``outside_bin`` is the fraction of latents whose
re-encoding g_a(output) leaves the quantization bin [ŷ − Δ/2, ŷ + Δ/2] the bitstream proves (the
original image has 0): the consistency that sample guidance enforces.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch

from ncpipe import metrics
from ncpipe.codec import LearnedCodec
from ncpipe.device import resolve_device
from ncpipe.diffusion.guidance import GuidanceConfig, bin_violation, encoder_input
from ncpipe.diffusion.refiner import (
    DecodedBatch,
    Refiner,
    RefinerMismatchError,
    bin_steps,
    decoded_batch,
    load_refiner,
)
from ncpipe.evaluation.learned import load_image_set
from ncpipe.evaluation.plots import plot_sweep
from ncpipe.io.image_files import list_image_files
from ncpipe.io.storage import atomic_writer
from ncpipe.manifest import arrow_schema
from ncpipe.models.cards import machine_description, now_utc
from ncpipe.models.registry import load_model, resolve_model

log = logging.getLogger(__name__)

CODEC_METHOD = "codec"


@dataclass(frozen=True)
class RefinerEvalConfig:
    codecs: tuple[str, ...]  # registry names or checkpoint paths (rate points)
    refiners: tuple[tuple[str, str], ...]  # (label, checkpoint path)
    images: str
    output: str
    steps: tuple[int, ...] = (1, 2, 4, 8)
    guidance: float = 0.0  # > 0: also evaluate the guided variant of each refiner in ``guided``
    guidance_low_frequency: float = 0.0
    guided: tuple[str, ...] = ()  # labels to guide; empty: every bridge refiner
    limit: int = 0  # first N images (sorted by name); 0 = all
    device: str = "auto"

    def __post_init__(self) -> None:
        labels = [label for label, _ in self.refiners]
        if len(set(labels)) != len(labels) or CODEC_METHOD in labels:
            raise ValueError(f"refiner labels must be unique and not {CODEC_METHOD!r}: {labels}")
        if not self.codecs or not self.steps or min(self.steps) < 1:
            raise ValueError("name at least one codec, and steps >= 1")
        unknown = set(self.guided) - set(labels)
        if unknown:
            raise ValueError(f"--guided names unknown refiner label(s) {sorted(unknown)}")


@dataclass(frozen=True)
class RefinerResult:
    codec: str
    rate: str  # λ of the codec
    method: str  # "codec", a refiner label, or "<label>+guidance"
    refiner_sha256: str
    steps: int  # K (0 for the codec itself)
    guidance: float  # latent-consistency strength S (0: off)
    image: str
    width: int
    height: int
    num_bytes: int
    bpp: float
    psnr: float
    ms_ssim: float
    decode_seconds: float  # whole decoder, refinement included
    refine_seconds: float
    outside_bin: float  # fraction of latents of g_a(output) outside their quantization bin


@dataclass(frozen=True)
class SummaryRow:
    codec: str
    rate: str
    method: str
    steps: int
    images: int
    bpp: float
    psnr: float
    delta_psnr: float  # mean over images of (method − codec) PSNR, dB
    ms_ssim: float
    decode_seconds: float
    refine_seconds: float
    outside_bin: float


@dataclass(frozen=True)
class _Method:
    name: str
    refiner: Refiner
    guidance: GuidanceConfig | None


def evaluate_refiners(config: RefinerEvalConfig, command: str = "") -> tuple[list[RefinerResult], tuple[Path, ...]]:
    """Run the comparison and write every output; returns (rows, written paths)."""
    device = resolve_device(config.device)
    images = load_image_set(list_image_files([config.images], config.limit))
    refiners = {label: load_refiner(path, device) for label, path in config.refiners}
    rows: list[RefinerResult] = []
    for codec_name in config.codecs:
        codec = LearnedCodec(load_model(codec_name).to(device), coder_threads=1)
        try:
            methods = _methods(config, refiners, codec, codec_name)
            for image_name, pixels in images:
                rows.extend(_evaluate_image(codec, short_name(codec_name), methods, config.steps, image_name, pixels))
                log.info("%s %s: %d rows", codec_name, image_name, len(rows))
        finally:
            codec.close()
    metadata = {
        "command": command, "date": now_utc(), "machine": machine_description(),
        "images": [name for name, _ in images], "refiners": {k: r.sha256 for k, r in refiners.items()},
    }
    return rows, write_outputs(Path(config.output), rows, metadata)


def short_name(codec_name: str) -> str:
    ref = resolve_model(codec_name)
    return ref.name if ref.card is not None else codec_name


def _methods(config: RefinerEvalConfig, refiners: dict[str, Refiner], codec: LearnedCodec, name: str) -> list[_Method]:
    methods = []
    guided = set(config.guided) or {k for k, r in refiners.items() if r.config.process == "bridge"}
    for label, refiner in refiners.items():
        try:
            refiner.check_codec(codec.model.identity.sha256)
        except RefinerMismatchError as err:
            log.warning("skipping refiner %r for codec %s: %s", label, name, err)
            continue
        methods.append(_Method(label, refiner, None))
        if config.guidance > 0.0 and label in guided:
            g = GuidanceConfig(strength=config.guidance, low_frequency=config.guidance_low_frequency)
            methods.append(_Method(f"{label}+guidance", refiner, g))
    return methods


def _evaluate_image(codec: LearnedCodec, codec_name: str, methods: Sequence[_Method], steps: Sequence[int],
                    image_name: str, pixels) -> list[RefinerResult]:
    data = codec.encode_batch([pixels], ["RGB"])[0]
    started = time.perf_counter()
    header, symbols = codec.decode_symbols(data)
    x_hat = codec.synthesise([header], [symbols])
    _sync(codec.device)
    base_seconds = time.perf_counter() - started
    decoded = decoded_batch(codec, [header], [symbols], x_hat)
    reference = metrics.to_unit_float(pixels).to(codec.device)
    common = dict(codec=codec_name, rate=f"{codec.model.identity.rate:g}", image=image_name, width=header.width,
                  height=header.height, num_bytes=len(data), bpp=8 * len(data) / (header.width * header.height))

    def row(method: str, sha: str, k: int, strength: float, output: torch.Tensor, refine_s: float) -> RefinerResult:
        out = metrics.quantize_8bit(output[None].float())
        return RefinerResult(
            **common, method=method, refiner_sha256=sha, steps=k, guidance=strength,
            psnr=float(metrics.psnr(reference, out)[0]), ms_ssim=float(metrics.ms_ssim(reference, out)[0]),
            decode_seconds=base_seconds + refine_s, refine_seconds=refine_s,
            outside_bin=outside_bin_fraction(codec, out, decoded),
        )

    rows = [row(CODEC_METHOD, "", 0, 0.0, x_hat[0], 0.0)]
    for method in methods:
        for k in steps:
            started = time.perf_counter()
            (refined,) = method.refiner.refine(decoded, k, method.guidance, codec=codec)
            _sync(codec.device)
            strength = method.guidance.strength if method.guidance else 0.0
            seconds = time.perf_counter() - started
            rows.append(row(method.name, method.refiner.sha256 or "", k, strength, refined, seconds))
    return rows


@torch.no_grad()
def outside_bin_fraction(codec: LearnedCodec, image01: torch.Tensor, decoded: DecodedBatch) -> float:
    """Fraction of latents of g_a(image) outside [ŷ − Δ/2, ŷ + Δ/2] (one image, (1, 3, h, w) in [0, 1])."""
    y = codec.model.adapter.analysis(encoder_input(image01, decoded.sizes[:1], decoded.padded))[0]
    steps = bin_steps(codec, decoded)[:1].to(y.device)
    return float((bin_violation(y.float(), decoded.y_hat[:1].to(y.device), steps) > 0).float().mean())


def summarise(rows: Sequence[RefinerResult]) -> list[SummaryRow]:
    """Mean per (codec, method, K); ΔPSNR against the codec's row of the same image."""
    base = {(r.codec, r.image): r.psnr for r in rows if r.method == CODEC_METHOD}
    groups: dict[tuple[str, str, str, int], list[RefinerResult]] = {}
    for r in rows:
        groups.setdefault((r.codec, r.rate, r.method, r.steps), []).append(r)
    summary = []
    for (codec, rate, method, k), group in groups.items():
        def mean(field: str, group: list[RefinerResult] = group) -> float:
            return statistics.fmean(getattr(r, field) for r in group)

        summary.append(SummaryRow(
            codec=codec, rate=rate, method=method, steps=k, images=len(group), bpp=mean("bpp"), psnr=mean("psnr"),
            delta_psnr=statistics.fmean(r.psnr - base[(r.codec, r.image)] for r in group),
            ms_ssim=mean("ms_ssim"), decode_seconds=mean("decode_seconds"), refine_seconds=mean("refine_seconds"),
            outside_bin=mean("outside_bin"),
        ))
    return summary


def render_markdown(summary: Sequence[SummaryRow], metadata: dict[str, Any]) -> str:
    lines = [
        "| codec | λ | method | K | bpp | PSNR (dB) | ΔPSNR (dB) | MS-SSIM | decode (s) | refine (s) | outside bin |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in summary:
        lines.append(
            f"| {s.codec} | {s.rate} | {s.method} | {s.steps} | {s.bpp:.4f} | {s.psnr:.3f} | {s.delta_psnr:+.3f} | "
            f"{s.ms_ssim:.4f} | {s.decode_seconds:.2f} | {s.refine_seconds:.2f} | {s.outside_bin:.4f} |"
        )
    header = (f"Images: {', '.join(metadata['images'])}. Command: `{metadata['command']}`, {metadata['date']}, "
              f"on {metadata['machine']}.")
    return "\n".join([header, "", *lines]) + "\n"


def write_outputs(output: Path, rows: Sequence[RefinerResult], metadata: dict[str, Any]) -> tuple[Path, ...]:
    output.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows)
    encoded = {k: json.dumps(v, default=str) for k, v in metadata.items()}
    results = pa.Table.from_pylist([asdict(r) for r in rows], schema=arrow_schema(RefinerResult))
    results = results.replace_schema_metadata(encoded)
    table = pa.Table.from_pylist([asdict(s) for s in summary], schema=arrow_schema(SummaryRow))
    written = [
        _write(output / "results.parquet", lambda h: pq.write_table(results, h, compression="zstd")),
        _write(output / "results.csv", lambda h: pacsv.write_csv(results, h)),
        _write(output / "summary.csv", lambda h: pacsv.write_csv(table, h)),
        _write(output / "summary.md", lambda h: h.write(render_markdown(summary, metadata).encode())),
    ]
    codecs = list(dict.fromkeys(s.codec for s in summary))
    for codec in codecs:
        suffix = "" if len(codecs) == 1 else f"_{codec}"
        points = _plot_rows([s for s in summary if s.codec == codec])
        written.append(plot_sweep(points, path=output / f"psnr_vs_steps{suffix}.png", x="steps", y="psnr",
                                  group="method", title=f"{codec}: PSNR vs sampler steps K (same bits)"))
        timed = [p for p in points if p["method"] != CODEC_METHOD]
        if timed:
            written.append(plot_sweep(timed, path=output / f"decode_time_vs_steps{suffix}.png", x="steps",
                                      y="decode_seconds", group="method", title=f"{codec}: decode time vs K"))
    return tuple(written)


def _plot_rows(summary: Sequence[SummaryRow]) -> list[dict[str, Any]]:
    """Summary points, with the codec drawn as a flat line across the K values of the refiners."""
    steps = sorted({s.steps for s in summary if s.method != CODEC_METHOD})
    points = []
    for s in summary:
        if s.method == CODEC_METHOD:
            points.extend({**asdict(s), "steps": k} for k in steps or [0])
        else:
            points.append(asdict(s))
    return points


def _write(path: Path, write) -> Path:
    with atomic_writer(str(path)) as handle:
        write(handle)
    return path


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
