"""``ncpipe train ...``: train a codec, release a run into the registry, import CompressAI zoo weights.

::

    ncpipe train codec [--spec jobs/train-codec.yaml] [--FIELD VALUE ...]  -> <run_dir>/train_state.pt
    ncpipe train release RUN_DIR --name NAME [--eval-images DIR]           -> models/NAME/{model.pt,card.json,...}
    ncpipe train import-zoo ARCH --quality Q [--file PATH] --name NAME     -> models/NAME/...
    ncpipe train refiner | corrdiff ...  (ncpipe.cli.refiner, ncpipe.cli.corrdiff)

A spec file is ``kind: <kind>`` plus ``spec:`` holding the config's fields (the shape
``ncpipe run SPEC`` dispatches on); flags given on the command line override the file.
Heavy imports (torch, CompressAI) happen inside the handlers, so ``ncpipe --help`` stays instant.
"""

from __future__ import annotations

import argparse
import logging
import shlex
from pathlib import Path
from typing import Any

from ncpipe.config import ConfigError
from ncpipe.operations.jobspec import merge_overrides, spec_fields

log = logging.getLogger(__name__)

TRAIN_CODEC_KIND = "train-codec"



# -- spec files and command lines, shared with ncpipe.cli.evaluate ------------------


# -- ncpipe train codec ----------------------------------------------------------------------


def _key_int(text: str) -> tuple[str, int]:
    key, sep, value = text.partition("=")
    try:
        if not sep or not key:
            raise ValueError
        return key, int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected KEY=INTEGER (e.g. N=128), got {text!r}") from None


# One flag per CodecTrainConfig field (tests/train/test_train_codec.py checks that none is missing).
# Defaults live in CodecTrainConfig (ncpipe/train/codec_trainer.py), not here, so they cannot drift.
TRAIN_CODEC_FLAGS: dict[str, dict[str, Any]] = {
    "data": dict(nargs="+", metavar="DATA", help="image folders/files, or WebDataset shards (URLs, brace "
                 "patterns, globs, shard folders; local, file:// or s3://)"),
    "run_dir": dict(metavar="DIR", help="where the training state is saved; re-running resumes from it"),
    "arch": dict(help="architecture: mbt2018-mean or bmshj2018-hyperprior"),
    "hparams": dict(nargs="+", type=_key_int, metavar="KEY=INT", help="architecture sizes, e.g. N=96 M=128"),
    "lambdas": dict(type=float, nargs="+", metavar="λ", help="rate-distortion trade-off(s): loss λ·255²·MSE + bpp; "
                    "one λ trains a fixed-rate model, several (increasing) a variable-rate model whose quality "
                    "levels 1..n are these λ"),
    "steps": dict(type=int, help="total optimizer steps (resume continues to this count)"),
    "batch_size": dict(type=int, help="crops per step"),
    "crop": dict(type=int, metavar="PX", help="square crop size; smaller images are skipped"),
    "lr": dict(type=float, help="learning rate of the main optimizer (Adam)"),
    "aux_lr": dict(type=float, help="learning rate of the entropy bottleneck's quantile (aux) optimizer"),
    "lr_decay_at": dict(type=float, metavar="FRACTION", help="the lr drops x0.1 after this fraction of the steps"),
    "clip_grad_norm": dict(type=float, help="gradient norm clip of the main optimizer"),
    "checkpoint_every": dict(type=int, metavar="STEPS", help="save the training state every this many steps"),
    "checkpoint_minutes": dict(type=float, metavar="MIN", help="... and at least every this many minutes"),
    "max_minutes": dict(type=float, metavar="MIN", help="stop after this much training time, saving the state "
                        "(run again to resume)"),
    "part_mib": dict(type=int, metavar="MIB", help="write the training state as parts of at most this many MiB"),
    "log_every": dict(type=int, metavar="STEPS", help="log mean loss/bpp/PSNR/aux every this many steps"),
    "seed": dict(type=int, help="seed of the weights' initialisation and of the crops"),
    "device": dict(help="auto (GPU when present), cpu or cuda[:N]"),
    "amp": dict(action=argparse.BooleanOptionalAction, help="bfloat16 mixed precision for the transforms (GPU only)"),
    "threads": dict(type=int, help="torch CPU threads (0: torch's default)"),
    "init_from": dict(metavar="CHECKPOINT",
                      help="start a new run from the weights of another run (its run_dir or train_state.pt) or of "
                      "a released model (models/NAME/model.pt)"),
}


def _add_train_codec(sub) -> None:
    p = sub.add_parser(
        "codec", help="train a CompressAI architecture with the rate-distortion loss",
        description="Rate-distortion training (loss λ·255²·MSE + bpp, plus the entropy bottleneck's aux loss) "
        "on random crops of image folders or WebDataset shards. The state is saved atomically every "
        "--checkpoint-every steps; running the same command again resumes. Every field can come from "
        f"--spec FILE.yaml (kind: {TRAIN_CODEC_KIND}, spec: {{field: value}}); flags override the file. "
        "Required: data and run_dir. Defaults: CodecTrainConfig in ncpipe/train/codec_trainer.py.",
    )
    p.add_argument("--spec", metavar="FILE.yaml",
                   help=f"a kind: {TRAIN_CODEC_KIND} spec file (e.g. jobs/train-codec.yaml)")
    for name, options in TRAIN_CODEC_FLAGS.items():
        flags = ["--" + name.replace("_", "-")] + (["--lambda"] if name == "lambdas" else [])
        p.add_argument(*flags, dest=name, default=argparse.SUPPRESS, **options)
    p.set_defaults(handler=_train_codec)


def train_codec_config(args: argparse.Namespace):
    """The CodecTrainConfig of a ``train codec`` command line: the spec file, then the flags."""
    from ncpipe.config import config_from_mapping
    from ncpipe.train.codec_trainer import CodecTrainConfig

    spec = spec_fields(args.spec, TRAIN_CODEC_KIND) if args.spec else {}
    overrides = {name: getattr(args, name) for name in TRAIN_CODEC_FLAGS if hasattr(args, name)}
    if "hparams" in overrides:
        overrides["hparams"] = dict(overrides["hparams"])
    where = f"{args.spec} spec" if args.spec else ""
    return config_from_mapping(CodecTrainConfig, merge_overrides(spec, overrides), where)


def _train_codec(args: argparse.Namespace) -> int:
    from ncpipe.train.codec_trainer import resume_step, train_codec

    config = train_codec_config(args)
    start = resume_step(config)
    if start >= config.steps:
        print(f"{config.run_dir} is already at step {start} of {config.steps}: nothing to train")
        return 0
    path = train_codec(config)
    from ncpipe.train.loop import load_state

    step = load_state(path)["step"]
    lambdas = ",".join(f"{v:g}" for v in config.lambdas)
    print(f"trained {config.arch} {config.hparams} λ={lambdas} to step {step} of {config.steps}: {path}\n"
          + ("run the same command again to continue; " if step < config.steps else "")
          + f"release it with: ncpipe train release {shlex.quote(config.run_dir)} --name NAME")
    return 0


# -- ncpipe train release --------------------------------------------------------------------


def _add_release(sub) -> None:
    p = sub.add_parser(
        "release", help="freeze a training run into the model registry (checkpoint + measured card)",
        description="Computes the entropy tables once, saves models/NAME/model.pt (weights-only, identified by "
        "its SHA-256), measures it on --eval-images with real bitstreams and writes card.json + README.md. "
        "The card records this command line.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a `train codec` run_dir (holding its training state)")
    _add_registry_options(p)
    p.add_argument("--eval-images", metavar="DIR", help="images measured for the card (default: "
                   "$NCPIPE_EVAL_IMAGES); required")
    p.add_argument("--default-quality", type=int, metavar="Q", help="a variable-rate model's default quality "
                   "level (default: the middle one)")
    p.add_argument("--dataset", help="name of the measured set in the card (default: the folder's name)")
    p.add_argument("--series", help="RD series the model belongs to in `ncpipe evaluate` (default: its architecture)")
    p.add_argument("--hardware", help="what it was trained on, for the card (e.g. '1x H100')")
    p.add_argument("--wall-hours", type=float, help="training wall time, for the card")
    p.set_defaults(handler=_release)


def _add_registry_options(p) -> None:
    """Where a released model goes and what its card says: shared by every release command."""
    p.add_argument("--name", required=True, help="registry name: the folder under --models-dir")
    p.add_argument("--models-dir", default="models", help="registry folder (default: models)")
    p.add_argument("--summary", help="one-line description for the card")
    p.add_argument("--overwrite", action="store_true", help="replace an existing registry entry of this name")


def _registry_folder(models_dir: str, name: str, overwrite: bool) -> Path:
    """``models_dir/name``, refusing to replace a released model (its bitstreams name its SHA-256)."""
    from ncpipe.models.registry import registry_roots

    if not name or "/" in name or name in (".", ".."):
        raise ConfigError(f"--name: {name!r} is not a folder name")
    directory = Path(models_dir) / name
    if directory.exists() and not overwrite:
        raise ConfigError(f"{directory} exists: bitstreams written with it need its exact weights; "
                          "choose another --name, or pass --overwrite")
    if Path(models_dir).resolve() not in {root.resolve() for root in registry_roots()}:
        log.warning("%s is not a registry root: add it to NCPIPE_MODEL_DIRS to load %s by name", models_dir, name)
    return directory


def _release(args: argparse.Namespace) -> int:
    from ncpipe.evaluation.run import dataset_label, default_images
    from ncpipe.io.image_files import list_image_files
    from ncpipe.models.cards import command_line, write_card
    from ncpipe.train.loop import has_state
    from ncpipe.train.release import release_run

    run_dir = Path(args.run_dir)
    if not has_state(run_dir):
        raise FileNotFoundError(f"{run_dir} holds no training state: is it a `ncpipe train codec` run_dir?")
    directory = _registry_folder(args.models_dir, args.name, args.overwrite)
    images_dir = Path(args.eval_images) if args.eval_images else default_images()
    if images_dir is None or not images_dir.is_dir():
        raise ConfigError(f"evaluation images {images_dir or '(none given)'} do not exist: pass --eval-images DIR "
                          "(or set NCPIPE_EVAL_IMAGES)")
    images = list_image_files([str(images_dir)])
    command = command_line(["train", "release", args.run_dir], [
        ("--name", args.name), ("--eval-images", args.eval_images), ("--dataset", args.dataset),
        ("--models-dir", args.models_dir), ("--summary", args.summary), ("--series", args.series),
        ("--hardware", args.hardware), ("--wall-hours", args.wall_hours), ("--default-quality", args.default_quality),
        ("--overwrite", args.overwrite),
    ])
    facts = {k: v for k, v in (("hardware", args.hardware), ("wall_hours", args.wall_hours)) if v is not None}
    card = release_run(
        run_dir=run_dir, models_dir=Path(args.models_dir), name=args.name, eval_images=images,
        dataset=dataset_label(args.dataset or images_dir.name, len(images)), command=command,
        summary=args.summary or f"Trained with `ncpipe train codec` ({run_dir.name}).", training_facts=facts,
        default_quality=args.default_quality,
    )
    if args.series:
        write_card(directory, {**card, "series": args.series})
    result = card["evaluations"][0]
    print(f"released {directory}: sha256 {card['sha256']}\n"
          f"{result['dataset']}: {result['bpp']:.4f} bpp, PSNR {result['psnr']:.2f} dB, "
          f"MS-SSIM {result['ms_ssim']:.4f}")
    return 0


def _add_release_decoder(sub) -> None:
    p = sub.add_parser(
        "release-decoder", help="put a trained refiner or CorrDiff decoder into the model registry",
        description="Copies a `train refiner` / `train corrdiff` checkpoint to models/NAME/ with a card "
        "(its SHA-256, codecs, network, training provenance and, from --results, the table an "
        "`evaluate-refiner` / `evaluate-corrdiff` run measured). Then `--refiner NAME` / `--corrdiff NAME` "
        "load it by name.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="refiner.pt or corrdiff.pt of a training run")
    _add_registry_options(p)
    p.add_argument("--results", metavar="DIR", help="an evaluate-refiner/evaluate-corrdiff output folder")
    p.set_defaults(handler=_release_decoder)


def _release_decoder(args: argparse.Namespace) -> int:
    from ncpipe.models.cards import command_line
    from ncpipe.train.release import release_decoder

    results = Path(args.results) if args.results else None
    if results is not None and not (results / "summary.md").is_file():
        raise FileNotFoundError(f"--results: {results} holds no summary.md (an evaluate-refiner/-corrdiff output)")
    directory = _registry_folder(args.models_dir, args.name, args.overwrite)
    command = command_line(["train", "release-decoder", args.checkpoint], [
        ("--name", args.name), ("--results", args.results), ("--models-dir", args.models_dir),
        ("--summary", args.summary), ("--overwrite", args.overwrite),
    ])
    card = release_decoder(Path(args.checkpoint), directory, args.summary or "A diffusion decoder.", command,
                           results)
    print(f"released {directory}: {card['kind']} sha256 {card['sha256']}")
    return 0


# -- ncpipe train import-zoo -----------------------------------------------------------------


def _add_import_zoo(sub) -> None:
    p = sub.add_parser(
        "import-zoo", help="release CompressAI zoo weights (a local file or the torch hub cache) into the registry",
        description="Reads CompressAI pretrained weights (MSE) without downloading anything: from --file, or "
        "from the torch hub cache (torch.hub.get_dir()/checkpoints/<arch>-<quality>-<hash>.pth.tar, where "
        "CompressAI's own zoo stores them). A zoo file name's hash must match the file's SHA-256. The model "
        "is built with CompressAI's state-dict loading, its entropy tables computed once, and saved as a "
        "registry model with a card saying where the weights came from.",
    )
    p.add_argument("arch", metavar="ARCH", help="mbt2018-mean or bmshj2018-hyperprior")
    p.add_argument("--quality", type=int, required=True, help="CompressAI quality level 1..8")
    p.add_argument("--file", metavar="PATH", help="the weights file (default: find it in the torch hub cache)")
    p.add_argument("--name", required=True, help="registry name")
    p.add_argument("--models-dir", default="models", help="registry folder (default: models)")
    p.add_argument("--lmbda", "--lambda", dest="lmbda", type=float,
                   help="rate parameter for the bitstreams (default: CompressAI's training λ for --quality)")
    p.add_argument("--eval-images", metavar="DIR", help="also measure it on these images for the card")
    p.add_argument("--dataset", help="name of the measured set in the card (default: the folder's name)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing registry model of this name")
    p.set_defaults(handler=_import_zoo)


def _import_zoo(args: argparse.Namespace) -> int:
    from ncpipe.evaluation.learned import load_image_set
    from ncpipe.evaluation.run import card_evaluation, dataset_label, evaluate_checkpoint
    from ncpipe.io.image_files import list_image_files
    from ncpipe.models.cards import command_line, write_card
    from ncpipe.models.checkpoint import file_sha256, save_checkpoint
    from ncpipe.models.registry import CHECKPOINT_NAME, ModelRef

    directory = _registry_folder(args.models_dir, args.name, args.overwrite)
    from ncpipe.models.zoo import find_zoo_file, import_zoo_weights

    path = Path(args.file) if args.file else find_zoo_file(args.arch, args.quality)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    checkpoint, source = import_zoo_weights(args.arch, args.quality, path, args.lmbda)
    sha256 = save_checkpoint(checkpoint, directory / CHECKPOINT_NAME)
    command = command_line(["train", "import-zoo", args.arch], [
        ("--quality", args.quality), ("--file", args.file), ("--name", args.name), ("--models-dir", args.models_dir),
        ("--lmbda", args.lmbda), ("--eval-images", args.eval_images), ("--dataset", args.dataset),
        ("--overwrite", args.overwrite),
    ])
    release = ("the file CompressAI publishes" if source["compressai_release"]
               else "not under CompressAI's published name")
    card = {
        "name": args.name,
        "summary": f"CompressAI zoo {args.arch} quality {args.quality} (MSE), imported, not retrained.",
        "arch": checkpoint["arch"], "hparams": checkpoint["hparams"], "rate": checkpoint["rate"], "sha256": sha256,
        "file_sha256": file_sha256(directory / CHECKPOINT_NAME),
        "series": f"compressai-zoo-{args.arch}",
        "source": source,
        "training": {"data": "Vimeo-90K crops (CompressAI's zoo training)",
                     "hardware": "CompressAI (not trained here)"},
        "notes": f"Weights from {path} (SHA-256 {source['file_sha256']}; {release}), imported with `{command}`. "
                 f"Rate parameter λ = {checkpoint['rate']['lambda']:g}: {source['lambda']}.",
        "evaluations": [],
    }
    if args.eval_images:
        files = list_image_files([args.eval_images])
        ref = ModelRef(args.name, directory / CHECKPOINT_NAME, sha256, card)
        results = evaluate_checkpoint(ref, load_image_set(files), "cpu")
        dataset = dataset_label(args.dataset or Path(args.eval_images).name, len(files))
        card["evaluations"] = [card_evaluation(results, dataset, command, "cpu")]
    write_card(directory, card)
    print(f"imported {path} as {directory}: {card['arch']} {card['hparams']} λ={card['rate']['lambda']:g} "
          f"sha256 {sha256}")
    return 0


# -- registration ----------------------------------------------------------------------------


def register(subparsers) -> None:
    """``ncpipe train`` and its subcommands (the diffusion package adds its refiners and CorrDiff here too)."""
    from ncpipe.cli import corrdiff as corrdiff_commands
    from ncpipe.cli import refiner as refiner_commands

    p = subparsers.add_parser("train", help="train codecs, release them into the registry, import zoo weights",
                              description="Training and model release commands.")
    train_sub = p.add_subparsers(dest="train_command", required=True, metavar="TRAIN_COMMAND")
    _add_train_codec(train_sub)
    _add_release(train_sub)
    _add_release_decoder(train_sub)
    _add_import_zoo(train_sub)
    refiner_commands.register_train(train_sub)
    corrdiff_commands.register_train(train_sub)
