"""``ncpipe evaluate-corrdiff``: CorrDiff's distortion-perception knob against the base codec and NC-Diffusion.

::

    image ─analyse, rANS─► v1 .ncb ─decode─► x̂                                  row "codec"
                              │        └──► refiner.refine(K)                    row "<refiner label>"
                              └─ compute_corrections(x) ─► + extension ─► v2 .ncb (its bytes are the bpp)
                                                                   └─decode at each p─► row "corrdiff" (p)
    rows ─► results.parquet / results.csv   one row per image x method (x p)
         ─► summary.csv / summary.md        mean per method (x p), with ΔPSNR to the codec
         ─► corrdiff_psnr_vs_p.png, corrdiff_hf_vs_p.png, corrdiff_msssim_vs_p.png, corrdiff_psnr_vs_hf.png

The codec and refiner rows decode the plain (version-1) bitstream; CorrDiff rows decode the version-2
bitstream carrying the coefficients, so their bpp includes the extension's bytes. ``hf_ratio`` is
``metrics.high_frequency_energy_ratio`` (spectral energy above ¼ of Nyquist, output / original: < 1
blurrier, ~1 as detailed as the original). Decode time is the whole decoder (parse, rANS, entropy
parameters, synthesis, plus the diffusion sampler where there is one). ``replay_match``: at p = ½ the
decoder's output equals the encoder's replay bit for bit.

Perceptual measures (``ncpipe.evaluation.perceptual``): GMSD and HaarPSI on every row (weight-free);
LPIPS, DISTS and FID need pretrained weights, and the evaluation logs and records which are missing.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ncpipe import metrics
from ncpipe.codec import LearnedCodec
from ncpipe.device import resolve_device, synchronize
from ncpipe.diffusion.corrdiff import (
    TRANSMITTED_PERCEPTION,
    attach_corrections,
    compute_corrections,
    corrdiff_decode,
    encoder_batch,
    knob_coefficient,
    load_corrdiff,
    read_corrections,
)
from ncpipe.diffusion.refiner import decoded_batch, load_refiner
from ncpipe.evaluation.learned import load_image_set
from ncpipe.evaluation.perceptual import (
    Interval,
    full_reference_scores,
    paired_interval,
    perceptual_message,
    perceptual_weights,
)
from ncpipe.evaluation.plots import plot_sweep
from ncpipe.evaluation.refiners import evaluated_qualities, short_name
from ncpipe.evaluation.tables import LEFT, RIGHT, markdown_table, text_writer, write_file, write_result_tables
from ncpipe.io.image_files import list_image_files
from ncpipe.models.cards import machine_description, now_utc
from ncpipe.models.registry import load_model

log = logging.getLogger(__name__)

CODEC_METHOD, CORRDIFF_METHOD = "codec", "corrdiff"


@dataclass(frozen=True)
class CorrDiffEvalConfig:
    codec: str  # registry name or checkpoint path
    corrdiff: str  # CorrDiff decoder checkpoint
    images: str
    output: str
    refiners: tuple[tuple[str, str], ...] = ()  # (label, checkpoint path) of NC-Diffusion refiners
    refiner_steps: int = 4
    perceptions: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    qualities: tuple[int, ...] = ()  # quality levels of a variable-rate codec (empty: all; a fixed-rate codec: its one)
    steps: int | None = None  # CorrDiff K (None: the decoder's default)
    bits: int | None = None  # b (None: the decoder's default)
    limit: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        labels = [label for label, _ in self.refiners]
        if len(set(labels)) != len(labels) or {CODEC_METHOD, CORRDIFF_METHOD} & set(labels):
            raise ValueError(f"refiner labels must be unique and not {CODEC_METHOD!r}/{CORRDIFF_METHOD!r}: {labels}")
        if not self.perceptions or any(not 0.0 <= p <= 1.0 for p in self.perceptions):
            raise ValueError(f"perception values must lie in [0, 1], got {self.perceptions}")
        if self.refiner_steps < 1:
            raise ValueError("refiner_steps must be >= 1")


@dataclass(frozen=True)
class CorrDiffResult:
    quality: int  # the codec's quality level (0: a fixed-rate codec)
    method: str  # "codec", a refiner label, or "corrdiff"
    perception: float  # p (NaN for rows without the knob)
    steps: int  # sampler steps (0 for the codec)
    bits: int  # bits per coefficient (0 without coefficients)
    image: str
    width: int
    height: int
    num_bytes: int  # the bitstream decoded for this row
    coefficient_bytes: int  # of which the CorrDiff extension (count, header, payload, CRC32)
    bpp: float
    psnr: float
    ms_ssim: float
    gmsd: float
    haarpsi: float
    hf_ratio: float
    mean_lambda: float  # mean λ_t the decoder applied (NaN without coefficients)
    encode_seconds: float
    decode_seconds: float
    replay_match: bool  # CorrDiff at p = ½: decoder output == encoder replay (True elsewhere by convention)


@dataclass(frozen=True)
class CorrDiffSummary:
    quality: int
    method: str
    perception: float
    images: int
    bpp: float
    coefficient_bytes: float
    psnr: float
    delta_psnr: float  # mean over images of (method − codec) PSNR, dB
    delta_psnr_low: float  # its 95 % confidence interval over images (paired)
    delta_psnr_high: float
    ms_ssim: float
    gmsd: float
    haarpsi: float
    hf_ratio: float
    mean_lambda: float
    encode_seconds: float
    decode_seconds: float


def evaluate_corrdiff(config: CorrDiffEvalConfig, command: str = "") -> tuple[list[CorrDiffResult], tuple[Path, ...]]:
    """Run the comparison and write every output; returns (rows, written paths)."""
    device = resolve_device(config.device)
    statuses = perceptual_weights()
    message = perceptual_message(statuses)
    if message:
        log.warning("%s", message)
    images = load_image_set(list_image_files([config.images], config.limit))
    codec = LearnedCodec(load_model(config.codec).to(device), coder_threads=1)
    try:
        sha = codec.model.identity.sha256
        decoder = load_corrdiff(config.corrdiff, device, codec_sha256=sha)
        refiners = {label: load_refiner(path, device, codec_sha256=sha) for label, path in config.refiners}
        rows: list[CorrDiffResult] = []
        for quality in evaluated_qualities(codec, config.qualities):
            for name, pixels in images:
                rows.extend(_evaluate_image(config, codec, decoder, refiners, name, pixels, quality))
                log.info("quality %d, %s: %d rows", quality, name, len(rows))
    finally:
        codec.close()
    metadata = {
        "command": command, "date": now_utc(), "machine": machine_description(), "codec": short_name(config.codec),
        "images": [name for name, _ in images], "corrdiff_sha256": decoder.sha256,
        "refiners": {k: r.sha256 for k, r in refiners.items()}, "refiner_steps": config.refiner_steps,
        "perceptual": message or "computed",
    }
    return rows, write_outputs(Path(config.output), rows, metadata)


def _evaluate_image(config: CorrDiffEvalConfig, codec: LearnedCodec, decoder, refiners: dict, name: str,
                    pixels: np.ndarray, quality: int) -> list[CorrDiffResult]:
    reference = metrics.to_unit_float(pixels).to(codec.device)
    started = time.perf_counter()
    analysed = codec.analyse([pixels], reconstruct=True, quality=quality)
    plain = codec.submit_entropy_coding(analysed, 0, "RGB").result()
    codec_encode = _elapsed(started, codec.device)
    started = time.perf_counter()
    encoded = compute_corrections(decoder, encoder_batch(codec, analysed, [name]), [reference[0]],
                                  steps=config.steps, bits=config.bits)
    corrected = attach_corrections(plain, encoded.coefficients[0])
    corrdiff_encode = codec_encode + _elapsed(started, codec.device)
    h, w = pixels.shape[:2]

    def row(method: str, output: torch.Tensor, data: bytes, decode_s: float, encode_s: float,
            **extra) -> CorrDiffResult:
        out = metrics.quantize_8bit(output[None].float())
        values = dict(perception=math.nan, steps=0, bits=0, coefficient_bytes=0, mean_lambda=math.nan,
                      replay_match=True)
        values.update(extra)
        scores = full_reference_scores(reference, out)
        return CorrDiffResult(
            quality=quality, method=method, image=name, width=w, height=h, num_bytes=len(data),
            bpp=8 * len(data) / (w * h), psnr=float(metrics.psnr(reference, out)[0]),
            ms_ssim=float(metrics.ms_ssim(reference, out)[0]), gmsd=scores.gmsd, haarpsi=scores.haarpsi,
            hf_ratio=float(metrics.high_frequency_energy_ratio(reference, out)[0]),
            encode_seconds=encode_s, decode_seconds=decode_s, **values,
        )

    started = time.perf_counter()
    header, symbols = codec.decode_symbols(plain)
    x_hat = codec.synthesise([header], [symbols])
    base_seconds = _elapsed(started, codec.device)
    rows = [row(CODEC_METHOD, x_hat[0], plain, base_seconds, codec_encode)]
    decoded = decoded_batch(codec, [header], [symbols], x_hat)
    for label, refiner in refiners.items():
        started = time.perf_counter()
        (refined,) = refiner.refine(decoded, config.refiner_steps)
        rows.append(row(label, refined, plain, base_seconds + _elapsed(started, codec.device), codec_encode,
                        steps=config.refiner_steps))
    extension_bytes = len(corrected) - len(plain)
    for p in config.perceptions:
        started = time.perf_counter()
        coefficients = read_corrections(corrected)
        header2, symbols2 = codec.decode_symbols(corrected)
        (out,) = corrdiff_decode(decoder, codec, [header2], [symbols2], [coefficients], p)
        decode_s = _elapsed(started, codec.device)
        match = bool(torch.equal(out, encoded.replay[0])) if p == TRANSMITTED_PERCEPTION else True
        if not match:
            log.warning("%s: the decoder's output at p = ½ differs from the encoder's replay", name)
        lam = float(knob_coefficient(torch.tensor(coefficients.values, dtype=torch.float64), p).mean())
        rows.append(row(CORRDIFF_METHOD, out, corrected, decode_s, corrdiff_encode, perception=p,
                        steps=len(coefficients.indexes) // decoder.config.coefficient_groups,
                        bits=coefficients.bits, coefficient_bytes=extension_bytes,
                        mean_lambda=lam, replay_match=match))
    return rows


def summarise(rows: Sequence[CorrDiffResult]) -> list[CorrDiffSummary]:
    """Mean per (quality, method, p); ΔPSNR against the codec's row of the same image, with its paired 95 % CI."""
    base = {(r.quality, r.image): r.psnr for r in rows if r.method == CODEC_METHOD}
    groups: dict[tuple[int, str, float], list[CorrDiffResult]] = {}
    for r in rows:
        groups.setdefault((r.quality, r.method, -1.0 if math.isnan(r.perception) else r.perception), []).append(r)
    summary = []
    for (quality, method, p), group in groups.items():
        def mean(field: str, group: list[CorrDiffResult] = group) -> float:
            return statistics.fmean(getattr(r, field) for r in group)

        gain = paired_interval([r.psnr - base[(r.quality, r.image)] for r in group])
        summary.append(CorrDiffSummary(
            quality=quality, method=method, perception=math.nan if p < 0 else p, images=len(group), bpp=mean("bpp"),
            coefficient_bytes=mean("coefficient_bytes"), psnr=mean("psnr"), delta_psnr=gain.mean,
            delta_psnr_low=gain.low, delta_psnr_high=gain.high, ms_ssim=mean("ms_ssim"), gmsd=mean("gmsd"),
            haarpsi=mean("haarpsi"), hf_ratio=mean("hf_ratio"), mean_lambda=mean("mean_lambda"),
            encode_seconds=mean("encode_seconds"), decode_seconds=mean("decode_seconds"),
        ))
    return summary


SUMMARY_COLUMNS = (("q", RIGHT), ("method", LEFT), ("p", RIGHT), ("bpp", RIGHT), ("coeff. bytes", RIGHT),
                   ("PSNR (dB)", RIGHT), ("ΔPSNR (dB) [95 % CI]", RIGHT), ("MS-SSIM", RIGHT), ("GMSD", RIGHT),
                   ("HaarPSI", RIGHT), ("HF ratio", RIGHT), ("mean λ", RIGHT), ("encode (s)", RIGHT),
                   ("decode (s)", RIGHT))


def render_markdown(summary: Sequence[CorrDiffSummary], metadata: dict[str, Any]) -> str:
    def dash(value: float, text: str) -> str:
        return "–" if math.isnan(value) else text

    lines = markdown_table(SUMMARY_COLUMNS, (
        (s.quality, s.method, dash(s.perception, f"{s.perception:g}"), f"{s.bpp:.4f}", f"{s.coefficient_bytes:.0f}",
         f"{s.psnr:.3f}", Interval(s.delta_psnr, s.delta_psnr_low, s.delta_psnr_high, s.images).text(),
         f"{s.ms_ssim:.4f}", f"{s.gmsd:.4f}", f"{s.haarpsi:.4f}", f"{s.hf_ratio:.3f}",
         dash(s.mean_lambda, f"{s.mean_lambda:.3f}"), f"{s.encode_seconds:.2f}", f"{s.decode_seconds:.2f}")
        for s in summary))
    header = (f"Codec {metadata['codec']}; images: {', '.join(metadata['images'])}. Command: `{metadata['command']}`, "
              f"{metadata['date']}, on {metadata['machine']}.")
    return "\n".join([header, "", *lines, "", str(metadata["perceptual"])]) + "\n"


def write_outputs(output: Path, rows: Sequence[CorrDiffResult], metadata: dict[str, Any]) -> tuple[Path, ...]:
    summary = summarise(rows)
    written = [
        *write_result_tables(output, rows, CorrDiffResult, summary, CorrDiffSummary, metadata),
        write_file(output / "summary.md", text_writer(render_markdown(summary, metadata))),
    ]
    qualities = sorted({s.quality for s in summary})
    for quality in qualities:  # one set of plots per quality level (no suffix when there is one)
        suffix, at = ("", "") if len(qualities) == 1 else (f"_q{quality}", f" (quality {quality})")
        part = [s for s in summary if s.quality == quality]
        points = sweep_rows(part)
        for y, name, title in (("psnr", "corrdiff_psnr_vs_p", "PSNR"), ("ms_ssim", "corrdiff_msssim_vs_p", "MS-SSIM"),
                               ("hf_ratio", "corrdiff_hf_vs_p", "high-frequency energy ratio (1 = original)")):
            written.append(plot_sweep(points, path=output / f"{name}{suffix}.png", x="perception", y=y,
                                      group="method", title=f"CorrDiff knob{at}: {title} vs perception p"))
        corr = [asdict(s) for s in part if s.method == CORRDIFF_METHOD]
        written.append(plot_sweep(corr, path=output / f"corrdiff_psnr_vs_hf{suffix}.png", x="hf_ratio", y="psnr",
                                  annotate="perception", title=f"CorrDiff{at}: distortion vs detail (labels: p)"))
    return tuple(written)


def sweep_rows(summary: Sequence[CorrDiffSummary]) -> list[dict[str, Any]]:
    """Summary points for the sweep plots: rows without the knob drawn flat across the p values."""
    ps = sorted({s.perception for s in summary if not math.isnan(s.perception)})
    points = []
    for s in summary:
        if math.isnan(s.perception):
            points.extend({**asdict(s), "perception": p} for p in ps or [0.0])
        else:
            points.append(asdict(s))
    return points



def _elapsed(started: float, device: torch.device) -> float:
    synchronize(device)
    return time.perf_counter() - started
