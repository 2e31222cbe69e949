"""``ncpipe evaluate-refiner``: diffusion refiners against their base codec, at identical bits.

::

    images ─► each codec, each quality: encode once ─► .ncb bytes ─► decode_symbols, synthesise ─► x̂  (row "codec")
                                                                            │
                   each refiner trained for this codec, each K, ± guidance ─┴─► refine ─► x̃           (one row each)
    rows ─► results.parquet / results.csv      one row per image x codec x quality x method x K
         ─► summary.csv / summary.md           mean per codec x quality x method x K, ΔPSNR to the codec + 95 % CI
         ─► gains.csv / gains.md               per codec x method x K: gains averaged over the qualities, 95 % CIs
         ─► gain_vs_steps[_<codec>].png, decode_time_vs_steps[_<codec>].png

Measures: PSNR, MS-SSIM, GMSD and HaarPSI (weight-free, ``ncpipe.evaluation.perceptual``), the
high-frequency energy ratio; LPIPS/DISTS need local weights and the tables say when they are absent.

Every method of a codec decodes the *same* bitstream, so bpp is identical by construction. Decode
time is the whole decoder: rANS + entropy parameters + synthesis, plus the refinement for refiner
rows (``refine_seconds`` alone is also kept). ``outside_bin`` is the fraction of latents whose
re-encoding g_a(output) leaves the quantization bin [ŷ − Δ/2, ŷ + Δ/2] the bitstream proves (the
original image has 0): the consistency that sample guidance enforces.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import torch

from ncpipe import metrics
from ncpipe.codec import LearnedCodec
from ncpipe.device import resolve_device, synchronize
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
from ncpipe.evaluation.perceptual import (
    Interval,
    full_reference_scores,
    paired_interval,
    perceptual_message,
    perceptual_weights,
)
from ncpipe.evaluation.plots import plot_sweep
from ncpipe.evaluation.tables import LEFT, RIGHT, markdown_table, text_writer, write_file, write_result_tables
from ncpipe.io.image_files import list_image_files
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
    qualities: tuple[int, ...] = ()  # quality levels of a variable-rate codec (empty: all; a fixed-rate codec: its one)

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
    quality: int  # the codec's quality level (0: a fixed-rate codec)
    rate: str  # λ of that quality
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
    gmsd: float  # lower is better
    haarpsi: float  # higher is better
    hf_ratio: float  # high-frequency energy, output / original
    decode_seconds: float  # whole decoder, refinement included
    refine_seconds: float
    outside_bin: float  # fraction of latents of g_a(output) outside their quantization bin


@dataclass(frozen=True)
class SummaryRow:
    codec: str
    quality: int
    rate: str
    method: str
    steps: int
    images: int
    bpp: float
    psnr: float
    delta_psnr: float  # mean over images of (method − codec) PSNR, dB
    delta_psnr_low: float  # its 95 % confidence interval over images (paired)
    delta_psnr_high: float
    ms_ssim: float
    gmsd: float
    haarpsi: float
    hf_ratio: float
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
            for quality in evaluated_qualities(codec, config.qualities):
                for image_name, pixels in images:
                    rows.extend(_evaluate_image(codec, short_name(codec_name), methods, config.steps, image_name,
                                                pixels, quality))
                    log.info("%s quality %d %s: %d rows", codec_name, quality, image_name, len(rows))
        finally:
            codec.close()
    message = perceptual_message(perceptual_weights())
    if message:
        log.warning("%s", message)
    metadata = {
        "command": command, "date": now_utc(), "machine": machine_description(),
        "images": [name for name, _ in images], "refiners": {k: r.sha256 for k, r in refiners.items()},
        "perceptual": message or "computed",
    }
    return rows, write_outputs(Path(config.output), rows, metadata)


def evaluated_qualities(codec: LearnedCodec, wanted: Sequence[int]) -> list[int]:
    """``wanted`` (default: every level) of a variable-rate codec; [0] for a fixed-rate codec."""
    levels = codec.model.quality
    if levels is None:
        if any(q != 0 for q in wanted):
            raise ValueError("a fixed-rate codec has no quality levels to evaluate")
        return [0]
    for quality in wanted:
        codec.model.check_quality(quality)
    return list(wanted) or list(range(1, len(levels.lambdas) + 1))


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
                    image_name: str, pixels, quality: int) -> list[RefinerResult]:
    data = codec.encode_batch([pixels], ["RGB"], quality=quality)[0]
    started = time.perf_counter()
    header, symbols = codec.decode_symbols(data)
    x_hat = codec.synthesise([header], [symbols])
    synchronize(codec.device)
    base_seconds = time.perf_counter() - started
    decoded = decoded_batch(codec, [header], [symbols], x_hat)
    reference = metrics.to_unit_float(pixels).to(codec.device)
    common = dict(codec=codec_name, quality=quality, rate=f"{header.rate:g}", image=image_name, width=header.width,
                  height=header.height, num_bytes=len(data), bpp=8 * len(data) / (header.width * header.height))

    def row(method: str, sha: str, k: int, strength: float, output: torch.Tensor, refine_s: float) -> RefinerResult:
        out = metrics.quantize_8bit(output[None].float())
        scores = full_reference_scores(reference, out)
        return RefinerResult(
            **common, method=method, refiner_sha256=sha, steps=k, guidance=strength,
            psnr=float(metrics.psnr(reference, out)[0]), ms_ssim=float(metrics.ms_ssim(reference, out)[0]),
            gmsd=scores.gmsd, haarpsi=scores.haarpsi,
            hf_ratio=float(metrics.high_frequency_energy_ratio(reference, out)[0]),
            decode_seconds=base_seconds + refine_s, refine_seconds=refine_s,
            outside_bin=outside_bin_fraction(codec, out, decoded),
        )

    rows = [row(CODEC_METHOD, "", 0, 0.0, x_hat[0], 0.0)]
    for method in methods:
        for k in steps:
            started = time.perf_counter()
            (refined,) = method.refiner.refine(decoded, k, method.guidance, codec=codec)
            synchronize(codec.device)
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
    """Mean per (codec, quality, method, K); ΔPSNR against the codec's row of the same image, with its paired CI."""
    base = {(r.codec, r.quality, r.image): r.psnr for r in rows if r.method == CODEC_METHOD}
    groups: dict[tuple[str, int, str, str, int], list[RefinerResult]] = {}
    for r in rows:
        groups.setdefault((r.codec, r.quality, r.rate, r.method, r.steps), []).append(r)
    summary = []
    for (codec, quality, rate, method, k), group in groups.items():
        def mean(field: str, group: list[RefinerResult] = group) -> float:
            return statistics.fmean(getattr(r, field) for r in group)

        gain = paired_interval([r.psnr - base[(r.codec, r.quality, r.image)] for r in group])
        summary.append(SummaryRow(
            codec=codec, quality=quality, rate=rate, method=method, steps=k, images=len(group), bpp=mean("bpp"),
            psnr=mean("psnr"), delta_psnr=gain.mean, delta_psnr_low=gain.low, delta_psnr_high=gain.high,
            ms_ssim=mean("ms_ssim"), gmsd=mean("gmsd"), haarpsi=mean("haarpsi"), hf_ratio=mean("hf_ratio"),
            decode_seconds=mean("decode_seconds"), refine_seconds=mean("refine_seconds"),
            outside_bin=mean("outside_bin"),
        ))
    return summary


@dataclass(frozen=True)
class GainRow:
    """A method's gain over its codec averaged over the evaluated qualities, with paired 95 % CIs over images."""

    codec: str
    method: str
    steps: int
    qualities: int
    images: int
    delta_psnr: float
    delta_psnr_low: float
    delta_psnr_high: float
    delta_ms_ssim: float
    delta_ms_ssim_low: float
    delta_ms_ssim_high: float
    delta_gmsd: float  # negative is better
    delta_haarpsi: float  # positive is better
    hf_ratio: float
    decode_seconds: float


def gains(rows: Sequence[RefinerResult]) -> list[GainRow]:
    """Per (codec, method, K): each image's gain averaged over the qualities, then mean and paired CI over images."""
    base = {(r.codec, r.quality, r.image): r for r in rows if r.method == CODEC_METHOD}
    groups: dict[tuple[str, str, int], list[RefinerResult]] = {}
    for r in rows:
        if r.method != CODEC_METHOD:
            groups.setdefault((r.codec, r.method, r.steps), []).append(r)
    table = []
    for (codec, method, k), group in groups.items():
        def per_image(field: str, group: list[RefinerResult] = group) -> list[float]:
            by_image: dict[str, list[float]] = {}
            for r in group:
                by_image.setdefault(r.image, []).append(getattr(r, field) - getattr(base[(r.codec, r.quality,
                                                                                            r.image)], field))
            return [statistics.fmean(v) for v in by_image.values()]

        psnr, msssim = paired_interval(per_image("psnr")), paired_interval(per_image("ms_ssim"))
        table.append(GainRow(
            codec=codec, method=method, steps=k, qualities=len({r.quality for r in group}), images=psnr.n,
            delta_psnr=psnr.mean, delta_psnr_low=psnr.low, delta_psnr_high=psnr.high, delta_ms_ssim=msssim.mean,
            delta_ms_ssim_low=msssim.low, delta_ms_ssim_high=msssim.high,
            delta_gmsd=statistics.fmean(per_image("gmsd")), delta_haarpsi=statistics.fmean(per_image("haarpsi")),
            hf_ratio=statistics.fmean(r.hf_ratio for r in group),
            decode_seconds=statistics.fmean(r.decode_seconds for r in group),
        ))
    return table


SUMMARY_COLUMNS = (("codec", LEFT), ("q", RIGHT), ("λ", LEFT), ("method", LEFT), ("K", RIGHT), ("bpp", RIGHT),
                   ("PSNR (dB)", RIGHT), ("ΔPSNR (dB) [95 % CI]", RIGHT), ("MS-SSIM", RIGHT), ("GMSD", RIGHT),
                   ("HaarPSI", RIGHT), ("HF ratio", RIGHT), ("decode (s)", RIGHT), ("refine (s)", RIGHT),
                   ("outside bin", RIGHT))
GAIN_COLUMNS = (("codec", LEFT), ("method", LEFT), ("K", RIGHT), ("qualities", RIGHT), ("images", RIGHT),
                ("ΔPSNR (dB) [95 % CI]", RIGHT), ("ΔMS-SSIM [95 % CI]", RIGHT), ("ΔGMSD", RIGHT),
                ("ΔHaarPSI", RIGHT), ("HF ratio", RIGHT), ("decode (s)", RIGHT))


def render_markdown(summary: Sequence[SummaryRow], metadata: dict[str, Any]) -> str:
    lines = markdown_table(SUMMARY_COLUMNS, (
        (s.codec, s.quality, s.rate, s.method, s.steps, f"{s.bpp:.4f}", f"{s.psnr:.3f}",
         Interval(s.delta_psnr, s.delta_psnr_low, s.delta_psnr_high, s.images).text(), f"{s.ms_ssim:.4f}",
         f"{s.gmsd:.4f}", f"{s.haarpsi:.4f}", f"{s.hf_ratio:.3f}", f"{s.decode_seconds:.2f}",
         f"{s.refine_seconds:.2f}", f"{s.outside_bin:.4f}") for s in summary))
    return "\n".join([_provenance_line(metadata), "", *lines, "", str(metadata["perceptual"])]) + "\n"


def render_gains(table: Sequence[GainRow], metadata: dict[str, Any]) -> str:
    lines = markdown_table(GAIN_COLUMNS, (
        (g.codec, g.method, g.steps, g.qualities, g.images,
         Interval(g.delta_psnr, g.delta_psnr_low, g.delta_psnr_high, g.images).text(),
         Interval(g.delta_ms_ssim, g.delta_ms_ssim_low, g.delta_ms_ssim_high, g.images).text(4),
         f"{g.delta_gmsd:+.4f}", f"{g.delta_haarpsi:+.4f}", f"{g.hf_ratio:.3f}", f"{g.decode_seconds:.2f}")
        for g in table))
    note = ("Gain = method − codec on the same bitstream (same bits), averaged over the qualities per image; "
            "intervals: paired Student-t over images.")
    return "\n".join([_provenance_line(metadata), "", *lines, "", note]) + "\n"


def _provenance_line(metadata: dict[str, Any]) -> str:
    return (f"Images: {', '.join(metadata['images'])}. Command: `{metadata['command']}`, {metadata['date']}, "
            f"on {metadata['machine']}.")


def write_outputs(output: Path, rows: Sequence[RefinerResult], metadata: dict[str, Any]) -> tuple[Path, ...]:
    summary, gain_table = summarise(rows), gains(rows)
    gain_arrow = pa.Table.from_pylist([asdict(g) for g in gain_table], schema=arrow_schema(GainRow))
    written = [
        *write_result_tables(output, rows, RefinerResult, summary, SummaryRow, metadata),
        write_file(output / "summary.md", text_writer(render_markdown(summary, metadata))),
        write_file(output / "gains.csv", lambda h: pacsv.write_csv(gain_arrow, h)),
        write_file(output / "gains.md", text_writer(render_gains(gain_table, metadata))),
    ]
    codecs = list(dict.fromkeys(s.codec for s in summary))
    for codec in codecs:
        suffix = "" if len(codecs) == 1 else f"_{codec}"
        points = [asdict(g) for g in gain_table if g.codec == codec]
        if not points:
            continue
        written.append(plot_sweep(points, path=output / f"gain_vs_steps{suffix}.png", x="steps", y="delta_psnr",
                                  group="method", title=f"{codec}: ΔPSNR over the codec vs K (same bits, "
                                  "mean over qualities)"))
        written.append(plot_sweep(points, path=output / f"decode_time_vs_steps{suffix}.png", x="steps",
                                  y="decode_seconds", group="method", title=f"{codec}: decode time vs K"))
    return tuple(written)
