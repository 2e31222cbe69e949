"""``ncpipe evaluate``: learned codecs against classical baselines on one image set (see ncpipe.evaluation.run)."""

from __future__ import annotations

import argparse
import logging

from ncpipe.operations.jobspec import merge_overrides, spec_fields

log = logging.getLogger(__name__)

EVALUATE_KIND = "evaluate"
# ncpipe.evaluation.baselines.BASELINE_NAMES, not imported so that --help stays instant
_BASELINE_NAMES = ("jpeg", "webp", "avif", "jpegxl")
_IMAGES_ENV = "NCPIPE_EVAL_IMAGES"  # ncpipe.evaluation.run.IMAGES_ENV


def register(subparsers) -> None:
    """Add ``ncpipe evaluate``."""
    p = subparsers.add_parser(
        "evaluate", help="rate-distortion of learned codecs and classical baselines on an image set",
        description="Codes every image with every model (real .ncb bitstreams, container counted) and every "
        "baseline at each of its quality levels, then writes results.parquet/.csv (per image and rate point), "
        "summary.csv (means), bd_rate.md/.json (each learned series vs each baseline, PSNR and MS-SSIM) and "
        "rd_psnr.png/rd_msssim.png into --output. A variable-rate model is measured at each of its quality "
        "levels. Progress (images done of the total, elapsed, ETA) goes to stderr. Fields can come from "
        f"--spec FILE.yaml (kind: {EVALUATE_KIND}, spec: {{field: value}}); flags override the file. "
        f"The image folder is required: --images DIR, or the environment variable {_IMAGES_ENV}.",
    )
    p.add_argument("--spec", metavar="FILE.yaml",
                   help=f"a kind: {EVALUATE_KIND} spec file (e.g. jobs/evaluate-kodak.yaml)")
    p.add_argument("--images", metavar="DIR", default=argparse.SUPPRESS,
                   help=f"image folder (required unless ${_IMAGES_ENV} names one)")
    p.add_argument("--models", nargs="+", metavar="NAME_OR_PATH", default=argparse.SUPPRESS,
                   help="registry names, model folders or checkpoint files (default: every registry model)")
    baselines = p.add_mutually_exclusive_group()
    baselines.add_argument("--baselines", nargs="+", choices=_BASELINE_NAMES, metavar="NAME",
                           default=argparse.SUPPRESS,
                           help=f"classical codecs to run, of {', '.join(_BASELINE_NAMES)} (default: all; a missing "
                           "one is an error that names it)")
    baselines.add_argument("--no-baselines", dest="baselines", action="store_const", const=[],
                           default=argparse.SUPPRESS, help="learned codecs only")
    p.add_argument("--output", "-o", metavar="DIR", default=argparse.SUPPRESS,
                   help="output folder (default: out/evaluate)")
    p.add_argument("--device", default=argparse.SUPPRESS,
                   help="auto (GPU when present), cpu or cuda[:N] (default: auto)")
    p.add_argument("--update-cards", dest="update_cards", action=argparse.BooleanOptionalAction,
                   default=argparse.SUPPRESS,
                   help="write the measured means into each evaluated registry model's card.json and README.md "
                   "(replacing its entry for this image set)")
    p.add_argument("--max-images", type=int, metavar="N", default=argparse.SUPPRESS,
                   help="only the first N images, sorted by name")
    p.add_argument("--dataset", default=argparse.SUPPRESS,
                   help="name of the image set in cards and titles (default: the folder's name)")
    p.set_defaults(handler=_evaluate)


_FIELDS = ("images", "models", "baselines", "output", "device", "update_cards", "max_images", "dataset")


def evaluate_config(args: argparse.Namespace):
    """The EvaluateConfig of an ``evaluate`` command line: the spec file, then the flags."""
    from ncpipe.config import config_from_mapping
    from ncpipe.evaluation.run import EvaluateConfig

    spec = spec_fields(args.spec, EVALUATE_KIND) if args.spec else {}
    overrides = {name: getattr(args, name) for name in _FIELDS if hasattr(args, name)}
    context = f"{args.spec} spec" if args.spec else ""
    return config_from_mapping(EvaluateConfig, merge_overrides(spec, overrides), context)


def _evaluate(args: argparse.Namespace) -> int:
    from ncpipe.evaluation.baselines import BaselineUnavailableError
    from ncpipe.evaluation.run import evaluate_job

    config = evaluate_config(args)
    try:
        report = evaluate_job(config)
    except BaselineUnavailableError as err:  # a RuntimeError, which ncpipe.cli.main does not report
        log.error("%s (leave it out with --baselines, or --no-baselines)", err)
        return 2
    print(report.text())
    return 0
