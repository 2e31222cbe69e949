"""``ncpipe evaluate``: learned codecs and classical baselines on one image set, in one run.

::

    images/ ─► decode once ─┬─► each learned model at each rate point: evaluate_learned (real .ncb) ─┐
                            └─► each baseline: sweep over its quality levels ───────────────────────┴─► rows
    rows ─► results.parquet / results.csv          one row per image x codec x rate point
         ─► summary.csv                            mean per codec x rate point
         ─► bd_rate.json / bd_rate.md              each learned series vs each baseline
         ─► rd_psnr.png / rd_msssim.png            one line per series
         ─► (--update-cards) card.json + README.md of each evaluated registry model

A *series* is one rate-distortion curve: a baseline's quality sweep, a variable-rate model's
quality levels (rate points ``q1``..``qn``; its series defaults to its name), or the fixed-rate
models that share a card's ``series`` (default: their architecture), one point (``λ=...``) per model.
BD-rates use the baseline as the anchor: negative means the learned series needs fewer
bits for the same quality. Every bpp counts whole files (the ``.ncb`` container, the
JPEG/WebP/AVIF/JPEG XL file), every quality is measured on the decoded 8-bit RGB image.
Progress (images coded of the run's total, elapsed time, ETA) goes to stderr: see ncpipe.progress.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ncpipe import __version__
from ncpipe.config import ConfigError
from ncpipe.evaluation.baselines import BASELINE_NAMES, ClassicalCodec, get_baselines, sweep
from ncpipe.evaluation.bdrate import bd_psnr, bd_rate
from ncpipe.evaluation.learned import ImageResult, evaluate_model, load_image_set, result_means, summarise_results
from ncpipe.evaluation.plots import plot_rd
from ncpipe.evaluation.tables import text_writer, write_file, write_result_tables
from ncpipe.io.image_files import list_image_files
from ncpipe.models.cards import machine_description, now_utc, read_card, write_card
from ncpipe.models.registry import ModelRef, list_models, resolve_model
from ncpipe.progress import Progress

log = logging.getLogger(__name__)

IMAGES_ENV = "NCPIPE_EVAL_IMAGES"  # the image folder when a run names none
LEARNED, BASELINE = "learned", "baseline"
BD_METRICS = ("psnr", "ms_ssim_db")  # quality axes of the BD table: PSNR (dB) and MS-SSIM in dB


@dataclass(frozen=True)
class EvaluateConfig:
    images: str | None = None  # folder of images; None: $NCPIPE_EVAL_IMAGES (one of the two is required)
    models: tuple[str, ...] = ()  # registry names or checkpoint paths; empty: every registry model
    baselines: tuple[str, ...] = BASELINE_NAMES  # empty: no baseline
    output: str = "out/evaluate"
    device: str = "auto"
    update_cards: bool = False  # write the measured means into each evaluated registry model's card
    max_images: int | None = None  # the first N images (sorted by name) only
    dataset: str | None = None  # dataset name in cards and titles; None: the image folder's name

    def __post_init__(self) -> None:
        if self.max_images is not None and (isinstance(self.max_images, bool) or self.max_images <= 0):
            raise ConfigError(f"max_images: must be a positive number, got {self.max_images!r}")
        unknown = [name for name in self.baselines if name not in BASELINE_NAMES]
        if unknown:
            raise ConfigError(f"baselines: unknown {unknown}; known: {list(BASELINE_NAMES)}")
        if not self.output:
            raise ConfigError("output: an output folder is required")


@dataclass(frozen=True)
class EvaluationRow:
    """One image coded at one rate point by one codec (the Parquet schema is derived from these fields)."""

    kind: str  # "learned" or "baseline"
    series: str  # the RD curve this point belongs to
    codec: str  # registry model name / checkpoint path, or the baseline's name
    rate_point: str  # "λ=0.0067" (fixed-rate model), "q2" (variable-rate model's quality) or "q50" (baseline)
    rate_parameter: float  # λ, or the baseline's quality level
    quality: int  # a variable-rate model's quality level; 0 for fixed-rate models and baselines
    model_sha256: str  # "" for baselines
    image: str
    width: int
    height: int
    num_bytes: int  # the whole file: .ncb container included
    bpp: float
    psnr: float  # dB on 8-bit RGB
    ms_ssim: float
    encode_seconds: float
    decode_seconds: float


@dataclass(frozen=True)
class SummaryRow:
    """Means over the image set of one codec at one rate point."""

    kind: str
    series: str
    codec: str
    rate_point: str
    rate_parameter: float
    quality: int
    images: int
    bpp: float
    psnr: float
    ms_ssim: float
    ms_ssim_db: float  # -10·log10(1 - mean MS-SSIM)
    encode_seconds: float
    decode_seconds: float


@dataclass(frozen=True)
class BdEntry:
    """BD-rate of one learned series against one baseline on one quality axis (None + error if undefined)."""

    series: str
    baseline: str
    metric: str  # "psnr" or "ms_ssim_db"
    bd_rate_percent: float | None
    bd_quality: float | None  # mean quality gain at equal rate (dB)
    error: str | None


@dataclass(frozen=True)
class EvaluationReport:
    output: Path
    dataset: str
    rows: tuple[EvaluationRow, ...]
    summary: tuple[SummaryRow, ...]
    bd: tuple[BdEntry, ...]
    files: tuple[Path, ...]
    updated_cards: tuple[Path, ...]
    complete: bool = True  # every measurement ran (a failure raises instead)

    def text(self) -> str:
        """Means per codec and rate point, the BD-rates and the files written, for a terminal."""
        lines = [f"{self.dataset}: {len(self.rows)} measurements -> {self.output}",
                 f"{'codec':32s} {'rate point':>12s} {'bpp':>8s} {'PSNR':>7s} {'MS-SSIM':>8s}"]
        lines += [f"{r.codec[-32:]:32s} {r.rate_point:>12s} {r.bpp:8.4f} {r.psnr:7.2f} {r.ms_ssim:8.4f}"
                  for r in self.summary]
        for e in self.bd:
            value = f"{e.bd_rate_percent:+.2f}%" if e.error is None else f"n/a ({e.error})"
            lines.append(f"BD-rate {e.series} vs {e.baseline} ({e.metric}): {value}")
        lines += [f"wrote {path}" for path in (*self.files, *self.updated_cards)]
        return "\n".join(lines)


@dataclass(frozen=True)
class _LearnedModel:
    ref: ModelRef
    series: str
    sha256: str
    qualities: tuple[int, ...]  # its rate points: levels 1..n of a variable-rate model, (0,) for a fixed-rate one
    default_quality: int  # 0 for a fixed-rate model


def dataset_label(name: str, image_count: int) -> str:
    """How cards name a measurement's image set; an evaluation replaces a card entry with the same label."""
    return f"{name} ({image_count} images)"


def default_images() -> Path | None:
    """The image folder named by $NCPIPE_EVAL_IMAGES, None when it is unset or empty."""
    value = os.environ.get(IMAGES_ENV)
    return Path(value) if value else None


def images_folder(config: EvaluateConfig) -> Path:
    """``config.images``, else $NCPIPE_EVAL_IMAGES; an error when neither names an existing folder."""
    folder = Path(config.images) if config.images else default_images()
    if folder is None:
        raise ConfigError(f"images: no image folder given; pass --images DIR or set {IMAGES_ENV}")
    if not folder.is_dir():
        source = "" if config.images else f" (from {IMAGES_ENV})"
        raise FileNotFoundError(f"image folder {folder}{source} does not exist; pass --images DIR")
    return folder


def image_files(config: EvaluateConfig) -> tuple[Path, list[Path]]:
    """The image folder and its image files (sorted, at most ``max_images``); errors name what is missing."""
    folder = images_folder(config)
    return folder, list_image_files([folder], config.max_images)


def evaluate_checkpoint(ref: ModelRef, images: list[tuple[str, np.ndarray]], device: str,
                        progress: Progress | None = None) -> list[ImageResult]:
    """Load one model (its SHA-256 checked against its card) and measure it on ``images`` at each of its
    rate points (every quality level of a variable-rate model)."""
    from ncpipe.codec import LearnedCodec
    from ncpipe.device import resolve_device
    from ncpipe.models.checkpoint import load_codec_model

    model = load_codec_model(ref.checkpoint, ref.expected_sha256).to(resolve_device(device))
    codec = LearnedCodec(model)
    try:
        return evaluate_model(codec, ref.name, images, progress)
    finally:
        codec.close()


def card_evaluation(results: list[ImageResult], dataset: str, command: str, device: str,
                    default_quality: int | None = None) -> dict[str, Any]:
    """The card entry for one model's measurement (means computed as the summary's).

    A variable-rate model's results (quality levels 1..n) need its ``default_quality``: a mean over
    levels means nothing, so the entry's top-level means are the default quality's, and ``qualities``
    holds the means of every level with its λ.
    """

    levels: dict[int, list[ImageResult]] = {}
    for r in results:
        levels.setdefault(r.quality, []).append(r)
    if set(levels) == {0}:  # a fixed-rate model
        return {**summarise_results(results, dataset, command), "device": device}
    if default_quality not in levels:
        raise ValueError(f"default quality {default_quality} is not among the measured levels {sorted(levels)}")
    qualities = [
        {"quality": q, "lambda": float(members[0].rate),
         **result_means(members)}
        for q, members in sorted(levels.items())
    ]
    return {**summarise_results(levels[default_quality], dataset, command), "device": device,
            "default_quality": default_quality, "qualities": qualities}


def equivalent_command(config: EvaluateConfig) -> str:
    """The ``ncpipe evaluate`` command line that runs ``config`` (fields left at their defaults omitted)."""
    from ncpipe.models.cards import command_line

    default, options = EvaluateConfig(), []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value == getattr(default, f.name):
            continue
        if f.name == "baselines" and not value:
            options.append(("--no-baselines", True))
        elif f.name == "update_cards":
            options.append(("--update-cards" if value else "--no-update-cards", True))
        else:
            options.append((f"--{f.name.replace('_', '-')}", value))
    return command_line(["evaluate"], options)


def evaluate_job(config: EvaluateConfig) -> EvaluationReport:
    """``run(config)`` for job specs of kind ``evaluate``: records the equivalent command line (with the
    image folder, also when it came from $NCPIPE_EVAL_IMAGES, so that the command reproduces the run)."""
    config = dataclasses.replace(config, images=str(images_folder(config)))
    return run_evaluation(config, equivalent_command(config))


def run_evaluation(config: EvaluateConfig, command: str) -> EvaluationReport:
    """Measure every model and baseline of ``config`` on its image set, write the outputs, then the cards."""
    from ncpipe.device import resolve_device

    device = str(resolve_device(config.device))
    folder, files = image_files(config)
    baselines = get_baselines(config.baselines)  # fail on a missing baseline before any work
    models = _learned_models(config.models)
    dataset = dataset_label(config.dataset or folder.name, len(files))
    images = load_image_set(files)
    learned_points = sum(len(model.qualities) for model in models)
    log.info("evaluating %d models (%d rate points) and baselines %s on %s (%s)",
             len(models), learned_points, list(baselines), dataset, device)
    rows: list[EvaluationRow] = []
    measured: list[tuple[_LearnedModel, list[ImageResult]]] = []
    # One unit per image coded at one learned rate point, or swept by one baseline.
    with Progress(len(images) * (learned_points + len(baselines)), label="evaluate") as progress:
        for model in models:
            results = evaluate_checkpoint(model.ref, images, device, progress)
            measured.append((model, results))
            rows.extend(_learned_rows(model, results))
        for codec in baselines.values():
            rows.extend(_baseline_rows(codec, images, progress))
    summary = summarise(rows)
    bd = bd_table(summary)
    metadata = {
        "config": asdict(config), "command": command, "dataset": dataset, "device": device, "date": now_utc(),
        "machine": machine_description(), "ncpipe_version": __version__,
        "models": {r.codec: r.model_sha256 for r in rows if r.kind == LEARNED},
    }
    output = Path(config.output)
    written = _write_outputs(output, rows, summary, bd, metadata)
    updated = []
    if config.update_cards:
        for model, results in measured:
            entry = card_evaluation(results, dataset, command, device, model.default_quality)
            updated.extend(_update_card(model.ref, entry))
    return EvaluationReport(output, dataset, tuple(rows), tuple(summary), tuple(bd), written, tuple(updated))


def _learned_models(names: Sequence[str]) -> list[_LearnedModel]:
    refs = [resolve_model(name) for name in names or [ref.name for ref in list_models()]]  # fetches store models
    if not refs:
        log.warning("the model registry is empty: evaluating baselines only")
    return [_learned_model(ref) for ref in refs]


def _learned_model(ref: ModelRef) -> _LearnedModel:
    from ncpipe.models.checkpoint import model_digest, read_checkpoint

    # Read before any model runs: the progress total needs every model's number of quality levels.
    checkpoint = read_checkpoint(ref.checkpoint)
    levels = checkpoint.get("quality")  # variable-rate models only: {"lambdas": [λ_1..λ_n], "default": q}
    card = ref.card or {}
    # A variable-rate model is a whole curve by itself; fixed-rate models of one architecture make one together.
    series = card.get("series") or (ref.name if levels else card.get("arch") or checkpoint["arch"])
    qualities = tuple(range(1, len(levels["lambdas"]) + 1)) if levels else (0,)
    return _LearnedModel(ref, series, ref.expected_sha256 or model_digest(checkpoint), qualities,
                         int(levels["default"]) if levels else 0)


def _learned_rows(model: _LearnedModel, results: list[ImageResult]) -> list[EvaluationRow]:
    return [
        EvaluationRow(
            kind=LEARNED, series=model.series, codec=r.codec, rate_point=_rate_point(r),
            rate_parameter=float(r.rate), quality=r.quality, model_sha256=model.sha256, image=r.image,
            width=r.width, height=r.height, num_bytes=r.num_bytes, bpp=r.bpp, psnr=r.psnr, ms_ssim=r.ms_ssim,
            encode_seconds=r.encode_seconds, decode_seconds=r.decode_seconds,
        )
        for r in results
    ]


def _rate_point(result: ImageResult) -> str:
    """``q2`` for a variable-rate model's quality level, ``λ=0.0067`` for a fixed-rate model."""
    return f"q{result.quality}" if result.quality else f"λ={result.rate}"


def _baseline_rows(
    codec: ClassicalCodec, images: list[tuple[str, np.ndarray]], progress: Progress
) -> list[EvaluationRow]:
    rows = []
    for name, pixels in images:
        height, width = pixels.shape[:2]
        for r in sweep(codec, pixels):
            rows.append(EvaluationRow(
                kind=BASELINE, series=codec.name, codec=codec.name, rate_point=f"q{r.quality}",
                rate_parameter=float(r.quality), quality=0, model_sha256="", image=name, width=width,
                height=height, num_bytes=r.num_bytes, bpp=r.bpp, psnr=r.psnr, ms_ssim=r.ms_ssim,
                encode_seconds=r.encode_seconds, decode_seconds=r.decode_seconds,
            ))
        progress.advance(codec.name)
    return rows


def summarise(rows: Sequence[EvaluationRow]) -> list[SummaryRow]:
    """Mean per (codec, rate point), in order of first appearance; means over images in image order."""
    groups: dict[tuple[str, str], list[EvaluationRow]] = {}
    for row in rows:
        groups.setdefault((row.codec, row.rate_point), []).append(row)
    summary = []
    for members in groups.values():
        first, means = members[0], result_means(members)
        summary.append(SummaryRow(
            kind=first.kind, series=first.series, codec=first.codec, rate_point=first.rate_point,
            rate_parameter=first.rate_parameter, quality=first.quality, images=len(members), **means,
            ms_ssim_db=ms_ssim_db(means["ms_ssim"]),
        ))
    return summary


def ms_ssim_db(value: float) -> float:
    """MS-SSIM on a dB scale, -10·log10(1 - MS-SSIM): spreads the values near 1 (NaN stays NaN)."""
    if math.isnan(value):
        return math.nan
    return math.inf if value >= 1.0 else -10.0 * math.log10(1.0 - value)


def bd_table(summary: Sequence[SummaryRow]) -> list[BdEntry]:
    """BD-rate and BD-quality of each learned series against each baseline and, when several learned
    series were measured, against each other learned series (is a new model worth recompressing
    for?), on PSNR and MS-SSIM (dB)."""
    curves: dict[tuple[str, str], list[SummaryRow]] = {}
    for row in summary:
        curves.setdefault((row.kind, row.series), []).append(row)
    learned = [series for kind, series in curves if kind == LEARNED]
    anchors = [(kind, series) for kind, series in curves if kind == BASELINE]
    anchors += [(LEARNED, series) for series in learned]
    entries = []
    for series in learned:
        for kind, anchor in anchors:
            if (kind, anchor) == (LEARNED, series):
                continue
            for metric in BD_METRICS:
                entries.append(_bd_entry(series, curves[(LEARNED, series)], anchor, curves[(kind, anchor)], metric))
    return entries


def _bd_entry(series: str, test: list[SummaryRow], baseline: str, anchor: list[SummaryRow], metric: str) -> BdEntry:
    anchor_curve = ([r.bpp for r in anchor], [getattr(r, metric) for r in anchor])
    test_curve = ([r.bpp for r in test], [getattr(r, metric) for r in test])
    try:
        rate = bd_rate(*anchor_curve, *test_curve)
        quality = bd_psnr(*anchor_curve, *test_curve)
    except ValueError as err:
        side = f"{series} ({len(test)} rate point{'s' if len(test) != 1 else ''})"
        message = str(err).replace("curve a", f"baseline {baseline}").replace("curve b", side)
        return BdEntry(series, baseline, metric, None, None, message)
    return BdEntry(series, baseline, metric, rate, quality, None)


def _update_card(ref: ModelRef, entry: dict[str, Any]) -> list[Path]:
    """Replace the card's entry for this dataset with ``entry`` and re-render its README."""
    if ref.card is None:
        log.warning("%s is a bare checkpoint (no card): nothing to update", ref.name)
        return []
    directory = ref.checkpoint.parent
    card = read_card(directory)
    if card["sha256"] != ref.expected_sha256:
        raise ConfigError(f"{directory}: its card changed during the evaluation (sha256 {card['sha256']})")
    kept = [e for e in card.get("evaluations", []) if e.get("dataset") != entry["dataset"]]
    card["evaluations"] = [*kept, entry]
    write_card(directory, card)
    log.info("updated the card of %s: %s", ref.name, entry["dataset"])
    return [directory / "card.json"]


def _write_outputs(
    output: Path, rows: list[EvaluationRow], summary: list[SummaryRow], bd: list[BdEntry], metadata: dict[str, Any]
) -> tuple[Path, ...]:
    written = [
        *write_result_tables(output, rows, EvaluationRow, summary, SummaryRow, metadata),
        write_file(output / "bd_rate.json", text_writer(_bd_json(bd, metadata))),
        write_file(output / "bd_rate.md", text_writer(render_bd_markdown(bd, metadata))),
    ]
    plot_rows = [asdict(r) for r in summary]
    title = metadata["dataset"]
    if plot_rows:
        written.append(plot_rd([*plot_rows, *_published_anchor_rows(title)], path=output / "rd_psnr.png", y="psnr",
                               group="series", title=f"{title}: PSNR vs rate"))
        try:
            written.append(plot_rd(plot_rows, path=output / "rd_msssim.png", y="ms_ssim_db", group="series",
                                   title=f"{title}: MS-SSIM vs rate"))
        except ValueError as err:  # every MS-SSIM NaN: images with a side <= 40 px
            log.warning("no MS-SSIM plot: %s", err)
    return tuple(written)


PUBLISHED_SERIES = "CompressAI mbt2018-mean (published, Kodak)"


def _published_anchor_rows(dataset: str) -> list[dict[str, Any]]:
    """CompressAI's published Kodak PSNR curve, drawn for reference on Kodak plots only (no MS-SSIM given)."""
    from ncpipe.models.cards import PUBLISHED_ANCHOR_MBT2018_MEAN

    if not dataset.startswith("kodak"):
        return []
    return [{"series": PUBLISHED_SERIES, "bpp": p["bpp"], "psnr": p["psnr"]} for p in PUBLISHED_ANCHOR_MBT2018_MEAN]



def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _bd_json(bd: list[BdEntry], metadata: dict[str, Any]) -> str:
    document = {
        "dataset": metadata["dataset"],
        "command": metadata["command"],
        "date": metadata["date"],
        "machine": metadata["machine"],
        "convention": "anchor = baseline (a classical codec, or another learned series); bd_rate_percent < 0: "
                      "the learned series needs fewer bits at equal quality; bd_quality > 0: it has higher quality "
                      "(dB) at equal rate",
        "entries": [
            {**asdict(e), "bd_rate_percent": _finite(e.bd_rate_percent), "bd_quality": _finite(e.bd_quality)}
            for e in bd
        ],
    }
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def render_bd_markdown(bd: Sequence[BdEntry], metadata: dict[str, Any]) -> str:
    lines = [
        f"# BD-rate on {metadata['dataset']}",
        "",
        "Anchor: the baseline (a classical codec, or another learned series). Negative BD-rate: the learned series "
        "needs fewer bits for the same quality; "
        "BD-quality: its mean quality gain (dB) at the same rate. MS-SSIM is in dB, -10·log10(1 - MS-SSIM).",
        "",
        f"Command: `{metadata['command']}`, {metadata['date']}, on {metadata['machine']}.",
        "",
        "| learned series | baseline | quality axis | BD-rate | BD-quality | note |",
        "| --- | --- | --- | ---: | ---: | --- |",
    ]
    for e in bd:
        rate = f"{e.bd_rate_percent:+.2f}%" if e.bd_rate_percent is not None else "n/a"
        quality = f"{e.bd_quality:+.3f} dB" if e.bd_quality is not None else "n/a"
        axis = "PSNR" if e.metric == "psnr" else "MS-SSIM (dB)"
        lines.append(f"| {e.series} | {e.baseline} | {axis} | {rate} | {quality} | {e.error or ''} |")
    if not bd:
        lines.append("| (no learned series and baseline to compare) | | | | | |")
    return "\n".join(lines) + "\n"
