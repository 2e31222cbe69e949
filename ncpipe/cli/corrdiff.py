"""CLI subcommands of CorrDiff: ``ncpipe train corrdiff`` and ``ncpipe evaluate-corrdiff``.

``register`` is called by ``ncpipe.cli`` (top-level commands); ``register_train`` by the ``train``
command group, with that group's subparsers. Heavy imports happen inside the handlers.
"""

from __future__ import annotations

import argparse

from ncpipe.cli.refiner import (
    add_evaluation_options,
    add_network_options,
    add_optimisation_options,
    add_run_options,
    float_tuple,
    int_tuple,
    labelled_path,
    run_evaluation,
    train_options,
)


def register(subparsers) -> None:
    """Top-level CorrDiff subcommands: ``evaluate-corrdiff``."""
    p = subparsers.add_parser(
        "evaluate-corrdiff",
        help="CorrDiff's distortion-perception sweep against the base codec and NC-Diffusion refiners",
        description="For each image: encode once with the codec (the codec and refiner rows decode that v1 "
        "bitstream), compute CorrDiff's correction coefficients and write them into a real v2 bitstream (their "
        "bytes count in its bpp), then decode it at every perception value p. Writes results.parquet/csv, "
        "summary.csv/md and sweep plots (PSNR, MS-SSIM, high-frequency energy ratio vs p) to --output.",
    )
    p.add_argument("--codec", required=True, help="registry name or checkpoint path of the decoder's codec")
    p.add_argument("--corrdiff", required=True,
                   help="CorrDiff decoder checkpoint, e.g. runs/corrdiff/tiny/corrdiff.pt")
    p.add_argument("--refiner", action="append", type=labelled_path, default=[], metavar="LABEL=PATH",
                   help="an NC-Diffusion refiner to compare with (repeat), "
                   "e.g. nc-diffusion=runs/refiners/nc-affm/refiner.pt")
    p.add_argument("--refiner-steps", type=int, default=4, help="sampler steps K of the refiners (default: 4)")
    add_evaluation_options(p)
    p.add_argument("--perception", type=float_tuple, default=(0.0, 0.25, 0.5, 0.75, 1.0),
                   help="knob values p to decode at (default: 0,0.25,0.5,0.75,1)")
    p.add_argument("--corrdiff-steps", "--steps", dest="corrdiff_steps", type=int, metavar="K",
                   help="CorrDiff sampler steps K (default: the decoder's; --steps is its older name)")
    p.add_argument("--corrdiff-bits", "--bits", dest="corrdiff_bits", type=int, metavar="B",
                   help="bits per coefficient b (default: the decoder's; --bits is its older name)")
    p.set_defaults(handler=_evaluate_corrdiff)


def _evaluate_corrdiff(args: argparse.Namespace) -> int:
    from ncpipe.evaluation.corrdiff_eval import CorrDiffEvalConfig, evaluate_corrdiff

    config = CorrDiffEvalConfig(
        codec=args.codec, corrdiff=args.corrdiff, refiners=tuple(args.refiner), refiner_steps=args.refiner_steps,
        images=args.images, output=args.output, perceptions=args.perception, steps=args.corrdiff_steps,
        bits=args.corrdiff_bits,
        limit=args.max_images, device=args.device, qualities=tuple(args.qualities),
    )
    return run_evaluation(args, evaluate_corrdiff, config)


def register_train(train_subparsers) -> None:
    """``ncpipe train corrdiff``."""
    p = train_subparsers.add_parser(
        "corrdiff",
        help="train a CorrDiff diffusion decoder on a frozen codec's latents (phase 2)",
        description="Trains a U-Net conditioned on the codec's decoded latent ŷ (never on x̂) to predict x0 under "
        "Gaussian diffusion (x_t = √ᾱ x0 + √(1−ᾱ) ε, cosine ᾱ). Resumable: re-run with the same --run-dir. The "
        "released decoder is <run-dir>/corrdiff.pt and only accepts the codec it was trained for.",
    )
    p.add_argument("--codec", required=True, help="registry name or checkpoint path of the frozen phase-1 codec")
    add_run_options(p, "corrdiff.pt")
    net = add_network_options(p, affm_help="plain skip connections")
    net.add_argument("--latent-features", type=int, default=8, help="F: channels of the ŷ conditioning map")
    net.add_argument("--conditioner-hidden", type=int, default=64, help="C: width of the conditioner's latent conv")
    net.add_argument("--multiscale", action="store_true",
                     help="also feed the latent-grid features to every U-Net level at its resolution")
    net.add_argument("--qualities", type=int_tuple, default=(),
                     help="quality levels of a variable-rate codec to train on (default: all)")
    enc = p.add_argument_group("encoder defaults (stored in the decoder)")
    enc.add_argument("--sample-steps", type=int, default=4, help="K: sampler steps, one coefficient each")
    enc.add_argument("--per-channel", action="store_true",
                     help="transmit one coefficient per step and RGB channel (3K coefficients) instead of per step")
    enc.add_argument("--coefficient-bits", type=int, default=4, help="b: bits per transmitted coefficient")
    add_optimisation_options(p, cache_help="keep the codec-decoded training set here (shared with `train refiner`)")
    p.set_defaults(handler=_train_corrdiff)


def train_corrdiff_config(args: argparse.Namespace):
    """The ``CorrDiffTrainConfig`` of a ``train corrdiff`` command line."""
    from ncpipe.train.corrdiff_trainer import CorrDiffTrainConfig

    return CorrDiffTrainConfig(
        codec=args.codec, latent_features=args.latent_features, conditioner_hidden=args.conditioner_hidden,
        sample_steps=args.sample_steps, coefficient_bits=args.coefficient_bits, multiscale=args.multiscale,
        coefficient_groups=3 if args.per_channel else 1, qualities=tuple(args.qualities), **train_options(args),
    )


def _train_corrdiff(args: argparse.Namespace) -> int:
    from ncpipe.train.corrdiff_trainer import train_corrdiff

    print(train_corrdiff(train_corrdiff_config(args)))
    return 0
