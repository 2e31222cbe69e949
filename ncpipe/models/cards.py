"""Model cards: ``card.json`` (machine-readable) and ``README.md`` rendered from it.

Every number in a card is written by code from a measurement (``ncpipe evaluate`` or the
release step), together with the command and machine that produced it.
"""

from __future__ import annotations

import json
import platform
import shlex
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ncpipe.models.registry import CARD_NAME

# CompressAI's published mbt2018-mean results on Kodak (compressai/zoo results JSON,
# quality 1, 3, 5, 7): the anchor each card states its gap to.
PUBLISHED_ANCHOR_MBT2018_MEAN = (
    {"quality": 1, "bpp": 0.124, "psnr": 27.70},
    {"quality": 3, "bpp": 0.307, "psnr": 31.12},
    {"quality": 5, "bpp": 0.662, "psnr": 34.95},
    {"quality": 7, "bpp": 1.234, "psnr": 38.79},
)


def command_line(words: Sequence[str], options: Sequence[tuple[str, Any]]) -> str:
    """``ncpipe <words> <options>`` as a shell line: the options given (None/False left out), in a fixed order."""
    parts = ["ncpipe", *words]
    for flag, value in options:
        if value is None or value is False:
            continue
        if value is True:
            parts.append(flag)
        elif isinstance(value, Mapping):
            parts += [flag, *(f"{k}={v}" for k, v in value.items())]
        elif isinstance(value, (list, tuple)):
            parts += [flag, *map(str, value)]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.node()} ({cpu}, {torch.get_num_threads()} torch threads, {gpu}), torch {torch.__version__}"


def now_utc() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def write_card(directory: Path, card: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CARD_NAME).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    (directory / "README.md").write_text(render_card(card))


def read_card(directory: Path) -> dict[str, Any]:
    return json.loads((directory / CARD_NAME).read_text())


def anchor_gap(bpp: float, psnr: float) -> dict[str, float] | None:
    """PSNR gap to the published mbt2018-mean curve at the same bpp (log-linear interpolation)."""
    import math

    points = PUBLISHED_ANCHOR_MBT2018_MEAN
    if not points[0]["bpp"] <= bpp <= points[-1]["bpp"]:
        return None
    for low, high in zip(points, points[1:]):
        if low["bpp"] <= bpp <= high["bpp"]:
            w = (math.log(bpp) - math.log(low["bpp"])) / (math.log(high["bpp"]) - math.log(low["bpp"]))
            anchor = low["psnr"] + w * (high["psnr"] - low["psnr"])
            return {"anchor_psnr_at_bpp": round(anchor, 2), "psnr_gap_db": round(psnr - anchor, 2)}
    return None


def render_card(card: dict[str, Any]) -> str:
    if card.get("kind", "codec") != "codec":
        return render_decoder_card(card)
    train = card.get("training", {})
    lines = [
        f"# {card['name']}",
        "",
        card.get("summary", ""),
        "",
        "| field | value |",
        "| --- | --- |",
        f"| architecture | `{card['arch']}` {card.get('hparams', {})} |",
        _rate_line(card),
        f"| model SHA-256 | `{card['sha256']}` |",
        f"| file SHA-256 | `{card.get('file_sha256', '')}` |",
        f"| training data | {train.get('data', '?')} |",
        f"| training | {train.get('steps', '?')} steps, batch {train.get('batch_size', '?')}, "
        f"{train.get('crop', '?')}px crops, lr {train.get('lr', '?')} |",
        f"| trained on | {train.get('hardware', '?')} ({train.get('wall_hours', '?')} h) |",
        "",
    ]
    for result in card.get("evaluations", []):
        lines += [f"## Measured: {result['dataset']}", ""]
        kodak = result["dataset"].startswith("kodak")  # the published curve is Kodak's
        lines += _quality_table(result["qualities"], kodak) if result.get("qualities") else _single_result(result)
        lines += [
            f"- measured {result['date']} on {result['machine']}",
            f"- command: `{result['command']}`",
            "",
        ]
    if card.get("notes"):
        lines += ["## Notes", "", card["notes"], ""]
    return "\n".join(lines)


def _rate_line(card: dict[str, Any]) -> str:
    quality = card.get("quality")
    if not quality:
        return f"| rate parameter | λ = {card['rate']['lambda']} (loss λ·255²·MSE + bpp) |"
    levels = ", ".join(f"{q}: {v:.4g}" for q, v in enumerate(quality["lambdas"], 1))
    return (f"| quality levels | 1..{len(quality['lambdas'])} (`--quality`, default {quality['default']}); "
            f"λ per level: {levels} (loss λ·255²·MSE + bpp) |")


def _single_result(result: dict[str, Any]) -> list[str]:
    lines = [
        f"- bpp {result['bpp']:.4f} (real bitstreams, container included), PSNR {result['psnr']:.2f} dB, "
        f"MS-SSIM {result['ms_ssim']:.4f}, {result['images']} images",
        f"- encode {result['encode_seconds']:.3f} s/image, decode {result['decode_seconds']:.3f} s/image",
    ]
    gap = result.get("anchor_gap")
    if gap:
        lines.append(f"- published CompressAI mbt2018-mean at this bpp: {gap['anchor_psnr_at_bpp']} dB "
                     f"(our gap: {gap['psnr_gap_db']:+.2f} dB)")
    return lines


def _quality_table(qualities: Sequence[dict[str, Any]], kodak: bool) -> list[str]:
    """One row per quality level: means over the images, and (on Kodak) the gap to the published curve."""
    lines = ["| quality | λ | bpp | PSNR (dB) | MS-SSIM | encode s/img | decode s/img | gap to published |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for q in qualities:
        gap = anchor_gap(q["bpp"], q["psnr"]) if kodak else None
        gap_text = f"{gap['psnr_gap_db']:+.2f} dB" if gap else "outside its range" if kodak else "– (not Kodak)"
        lines.append(f"| {q['quality']} | {q['lambda']:.4g} | {q['bpp']:.4f} | {q['psnr']:.2f} | {q['ms_ssim']:.4f} "
                     f"| {q['encode_seconds']:.3f} | {q['decode_seconds']:.3f} | {gap_text} |")
    return [*lines, "", "bpp counts real bitstreams, container included; the published curve is CompressAI's "
            "mbt2018-mean on Kodak (log-linear interpolation).", ""]


def render_decoder_card(card: dict[str, Any]) -> str:
    """The human-readable card of a diffusion decoder (refiner or CorrDiff)."""
    codecs = ", ".join(f"`{c.get('name') or 'not in this registry'}` (λ = {c['rate']:.4g}, "
                       f"sha256 `{c['sha256'][:12]}…`)" for c in card["codecs"])
    lines = [
        f"# {card['name']}", "", card.get("summary", ""), "",
        "| field | value |", "| --- | --- |",
        f"| kind | {card['kind']} |",
        f"| decoder SHA-256 | `{card['sha256']}` |",
        f"| file SHA-256 | `{card['file_sha256']}` |",
        f"| for codecs | {codecs} |",
        f"| network | `{json.dumps(card['config'], sort_keys=True)}` |",
        f"| training | `{json.dumps(card.get('provenance', {}), sort_keys=True, default=str)}` |",
        f"| released | {card['released']} with `{card['command']}` |", "",
    ]
    if card.get("measured"):
        lines += ["## Measured", "", card["measured"], ""]
    return "\n".join(lines)
