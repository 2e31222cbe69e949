"""CLI subcommands of the diffusion decoders: ``ncpipe train refiner`` and ``ncpipe evaluate-refiner``.

``register`` is called by ``ncpipe.cli`` (top-level commands); ``register_train`` by the ``train``
command group, with that group's subparsers. Heavy imports happen inside the handlers.
"""

from __future__ import annotations

import argparse
import shlex
import sys


def _tuple_of(convert, what: str):
    """An argparse type: comma-separated values -> a non-empty tuple."""
    def parse(text: str) -> tuple:
        try:
            values = tuple(convert(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one of the {what}")
        return values

    return parse


TRAIN_REFINER_KIND = "train-refiner"
int_tuple = _tuple_of(int, "integers")
float_tuple = _tuple_of(float, "numbers")


def labelled_path(text: str) -> tuple[str, str]:
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"expected LABEL=PATH, got {text!r}")
    return label, path


def register(subparsers) -> None:
    """Top-level diffusion subcommands: ``evaluate-refiner``."""
    p = subparsers.add_parser(
        "evaluate-refiner",
        help="compare diffusion refiners with their base codec at identical bits (PSNR, MS-SSIM, decode time vs K)",
        description="For each codec (rate point) and image: encode once, decode the codec's x̂, then refine the same "
        "bitstream with every refiner trained for that codec at each K (and with sample guidance for bridge "
        "refiners when --guidance > 0). Writes results.parquet/csv, summary.csv/md and plots to --output.",
    )
    p.add_argument("--codec", action="append", required=True,
                   help="registry name or checkpoint path (repeat per rate point)")
    p.add_argument("--refiner", action="append", type=labelled_path, default=[], metavar="LABEL=PATH",
                   help="a refiner checkpoint and its method label (repeat); e.g. nc=runs/refiners/nc/refiner.pt")
    add_evaluation_options(p)
    p.add_argument("--refiner-steps", "--steps", dest="refiner_steps", type=int_tuple, default=(1, 2, 4, 8),
                   metavar="K,...", help="refiner sampler steps K (default: 1,2,4,8; --steps is its older name)")
    p.add_argument("--guidance", type=float, default=0.0,
                   help="latent-consistency strength S for the guided variants (0: none)")
    p.add_argument("--guidance-low-frequency", type=float, default=0.0, help="low-frequency consistency weight w")
    p.add_argument("--guided", action="append", default=[], metavar="LABEL",
                   help="refiners to evaluate with guidance too (default: every bridge refiner)")
    p.set_defaults(handler=_evaluate_refiner)


def _evaluate_refiner(args: argparse.Namespace) -> int:
    from ncpipe.evaluation.refiners import RefinerEvalConfig, evaluate_refiners

    config = RefinerEvalConfig(
        codecs=tuple(args.codec), refiners=tuple(args.refiner), images=args.images, output=args.output,
        steps=args.refiner_steps, guidance=args.guidance, guidance_low_frequency=args.guidance_low_frequency,
        guided=tuple(args.guided), limit=args.max_images, device=args.device, qualities=tuple(args.qualities),
    )
    return run_evaluation(args, evaluate_refiners, config)


# -- options and running, shared by the evaluations (``evaluate-refiner``, ``evaluate-corrdiff``) ----


def add_evaluation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", required=True, help="folder of evaluation images (e.g. Kodak)")
    p.add_argument("--qualities", type=int_tuple, default=(),
                   help="quality levels of a variable-rate codec to evaluate (default: all)")
    p.add_argument("--max-images", "--limit", dest="max_images", type=int, default=0, metavar="N",
                   help="only the first N images, sorted by name (default: all; --limit is its older name)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu or cuda[:N] (default: auto)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads torch uses (0: torch's default)")


def run_evaluation(args: argparse.Namespace, evaluate, config) -> int:
    """``evaluate(config, command=...)`` on ``--threads`` torch threads; prints the files it wrote."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    _, written = evaluate(config, command=typed_command())
    print("\n".join(str(p) for p in written))
    return 0


def register_train(train_subparsers) -> None:
    """``ncpipe train refiner``."""
    p = train_subparsers.add_parser(
        "refiner",
        help="train an NC-Diffusion refiner (or the Gaussian-start baseline) for frozen codec checkpoints",
        description="Trains a conditional U-Net on the codec's real reconstructions x̂ of the training images "
        "at every quality of a variable-rate codec (bridge x_t = x0 + η(x̂ − x0) with η drawn continuously, "
        "x0 target, EMA of the weights). Trains in windows: --max-minutes ends one with the state saved, "
        "re-running with the same --run-dir resumes, --init-from starts a new run from released weights. "
        "<run-dir>/refiner.pt holds the best EMA weights so far and only accepts the codecs it was trained for.",
    )
    p.add_argument("--spec", metavar="FILE.yaml", help=f"a kind: {TRAIN_REFINER_KIND} spec file (e.g. "
                   "jobs/train-refiner.yaml); the flags given override its fields")
    p.add_argument("--codec", action="append",
                   help="registry name or checkpoint path; repeat for several rate points of one architecture")
    add_run_options(p, "refiner.pt", required=False)
    p.add_argument("--baseline", choices=("gaussian",),
                   help="train the CDC-style Gaussian-start baseline (same U-Net, conditioned on x̂) instead")
    net = add_network_options(p, affm_help="plain skip connections (the AFFM ablation)")
    net.add_argument("--latent-features", type=int, default=0, help="condition on F channels projected from ŷ (0: off)")
    net.add_argument("--rate-conditioning", action="store_true",
                     help="condition on log λ (one refiner for several rates)")
    proc = p.add_argument_group("process")
    proc.add_argument("--schedule", choices=("geometric", "linear", "polynomial"), default="geometric")
    proc.add_argument("--eta-min", type=float, default=0.05)
    proc.add_argument("--eta-power", type=float, default=1.0)
    proc.add_argument("--train-schedule-steps", type=int, default=4,
                      help="T: with --train-levels discrete, training draws η from the T-step schedule")
    proc.add_argument("--train-levels", choices=("continuous", "discrete"), default="continuous",
                      help="continuous: η from the whole range of the schedule family, every K in distribution")
    proc.add_argument("--kappa", type=float, default=0.0, help="Gaussian term κ·sqrt(η)·ε of the bridge (0: none)")
    proc.add_argument("--parameterization", choices=("auto", "residual", "x0"), default="auto")
    proc.add_argument("--loss", choices=("l2", "l1"), default="l2")
    proc.add_argument("--qualities", type=int_tuple, default=(),
                      help="quality levels of a variable-rate codec to train on (default: all)")
    proc.add_argument("--validation-crops", type=int, default=16,
                      help="size of the fixed batch on which each save's EMA weights are scored")
    add_optimisation_options(p, cache_help="keep the codec-decoded training set here and reuse it across runs")
    p.set_defaults(handler=_train_refiner, unset=vars(p.parse_args([])))  # what each flag is when not given


def train_refiner_config(args: argparse.Namespace):
    """The ``RefinerTrainConfig`` of a ``train refiner`` command line: the spec file's fields (when
    ``--spec``), then every flag that was given."""
    from ncpipe.config import ConfigError, config_from_mapping
    from ncpipe.operations.jobspec import spec_fields
    from ncpipe.train.refiner_trainer import RefinerTrainConfig

    fields = _refiner_fields(args)
    if args.spec:
        defaults = _refiner_fields(argparse.Namespace(**args.unset))
        given = {k: v for k, v in fields.items() if v != defaults[k]}
        fields = {**defaults, **spec_fields(args.spec, TRAIN_REFINER_KIND), **given}
    if not fields["codecs"] or not fields["data"] or not fields["run_dir"]:
        raise ConfigError("train refiner needs --codec, --data and --run-dir (flags or spec fields)")
    return config_from_mapping(RefinerTrainConfig, fields, f"{args.spec} spec" if args.spec else "")


def _refiner_fields(args: argparse.Namespace) -> dict:
    return dict(
        codecs=tuple(args.codec or ()), process="gaussian" if args.baseline == "gaussian" else "bridge",
        latent_features=args.latent_features, rate_conditioning=args.rate_conditioning, schedule=args.schedule,
        eta_min=args.eta_min, eta_power=args.eta_power, train_schedule_steps=args.train_schedule_steps,
        train_levels=args.train_levels, kappa=args.kappa, parameterization=args.parameterization, loss=args.loss,
        qualities=tuple(args.qualities), validation_crops=args.validation_crops, **train_options(args),
    )


def _train_refiner(args: argparse.Namespace) -> int:
    from ncpipe.train.refiner_trainer import train_refiner

    print(train_refiner(train_refiner_config(args)))
    return 0


def typed_command() -> str:
    """The command as typed, for the provenance of what it writes."""
    return "ncpipe " + " ".join(shlex.quote(a) for a in sys.argv[1:])


# -- options every diffusion trainer has (``train refiner``, ``train corrdiff``) ----------------


def add_run_options(p: argparse.ArgumentParser, released: str, required: bool = True) -> None:
    p.add_argument("--data", action="append", required=required,
                   help="training images (folder, file or shards); repeatable")
    p.add_argument("--run-dir", required=required, help=f"training state and {released} go here")


def add_network_options(p: argparse.ArgumentParser, affm_help: str) -> argparse._ArgumentGroup:
    """The U-Net's size; returns the group, for the network's own options."""
    from ncpipe.diffusion.presets import UNET_PRESETS

    net = p.add_argument_group("network")
    net.add_argument("--preset", choices=sorted(UNET_PRESETS), default="small",
                     help="a named U-Net size (default: small); the four flags below override its fields")
    net.add_argument("--base-channels", type=int)
    net.add_argument("--channel-mults", type=int_tuple)
    net.add_argument("--blocks-per-level", type=int)
    net.add_argument("--time-embed-dim", type=int)
    net.add_argument("--no-affm", action="store_true", help=affm_help)
    return net


def add_optimisation_options(p: argparse.ArgumentParser, cache_help: str) -> None:
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--steps", type=int, default=20000)
    opt.add_argument("--batch-size", type=int, default=8)
    opt.add_argument("--crop", type=int, default=128, help="crop side, a multiple of 16")
    opt.add_argument("--lr", type=float, default=2e-4)
    opt.add_argument("--warmup-steps", type=int, default=100)
    opt.add_argument("--lr-decay-at", type=float, default=0.85)
    opt.add_argument("--max-images", type=int, default=0, help="use the first N training images (0: all)")
    opt.add_argument("--cache-dir", help=cache_help)
    opt.add_argument("--checkpoint-every", type=int, default=500)
    opt.add_argument("--checkpoint-minutes", type=float, default=10.0, help="... and at least every this many minutes")
    opt.add_argument("--max-minutes", type=float, help="end this training window after this much training time, "
                     "saving the state (run again to resume)")
    opt.add_argument("--init-from", metavar="CHECKPOINT", help="start a new run from released weights (refiner.pt, "
                     "corrdiff.pt, a registry folder's file) or another run's --run-dir")
    opt.add_argument("--ema-decay", type=float, default=0.999, help="the released weights are this EMA (0: raw)")
    opt.add_argument("--part-mib", type=int, help="write the training state as parts of at most this many MiB")
    opt.add_argument("--log-every", type=int, default=50)
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--device", default="auto")
    opt.add_argument("--no-amp", action="store_true", help="no bfloat16 autocast on GPUs")
    opt.add_argument("--threads", type=int, default=0)


def train_options(args: argparse.Namespace) -> dict:
    """The ``DiffusionTrainOptions`` fields (and data, run_dir) of a diffusion trainer's command line."""
    from ncpipe.diffusion.presets import UNET_PRESETS

    size = UNET_PRESETS[args.preset]
    sizes = {name: getattr(args, name) if getattr(args, name) is not None else getattr(size, name)
             for name in ("base_channels", "channel_mults", "blocks_per_level", "time_embed_dim")}
    return dict(
        data=tuple(args.data or ()), run_dir=args.run_dir, **sizes,
        affm=not args.no_affm, steps=args.steps, checkpoint_minutes=args.checkpoint_minutes,
        max_minutes=args.max_minutes, init_from=args.init_from, ema_decay=args.ema_decay, part_mib=args.part_mib,
        batch_size=args.batch_size, crop=args.crop, lr=args.lr,
        warmup_steps=args.warmup_steps, lr_decay_at=args.lr_decay_at, checkpoint_every=args.checkpoint_every,
        log_every=args.log_every, seed=args.seed, device=args.device, amp=not args.no_amp, threads=args.threads,
        max_images=args.max_images, cache_dir=args.cache_dir,
    )
