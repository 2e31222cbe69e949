"""``ncpipe`` command line. Each subcommand builds a typed config and calls one job function.

Heavy imports (torch, ray) happen inside the handlers, so ``ncpipe --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Callable, Sequence

from ncpipe import __version__
from ncpipe.cli.exit_status import EXIT_INTERRUPTED, EXIT_USAGE, add_allow_errors, job_exit_status
from ncpipe.config import (
    DEFAULT_MODEL,
    EXECUTORS,
    RESTORE_CHOICES,
    ClusterConfig,
    CompressConfig,
    ConfigError,
    DecompressConfig,
    RecompressConfig,
)
from ncpipe.errors import NcpipeError
from ncpipe.images import DEFAULT_MAX_PIXELS, DEFAULT_PNG_LEVEL, DEFAULT_RESTORE_QUALITY
from ncpipe.resources import demo_shards_dir

log = logging.getLogger("ncpipe")



def _add_cluster_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("workers")
    group.add_argument("--address", help="join this Ray cluster (e.g. auto, ray://head:10001); default: "
                       "this machine (see --executor; Ray there is an embedded one bound to 127.0.0.1)")
    group.add_argument("--workers", type=int, help="codec actors (default: one per GPU, else one)")
    group.add_argument("--cpus-per-worker", type=float, help="CPUs each actor reserves and uses as threads")
    group.add_argument("--executor", choices=EXECUTORS, default="auto",
                       help="where the worker runs: ray (actors on Ray, embedded or --address), in-process (one "
                       "worker in this process, no Ray), auto (in-process for one worker on this machine: no "
                       "--address, --workers 1 or unset, at most one GPU; else ray) (default: auto)")


DEVICE_HELP = "auto (a GPU when there is one), cpu or cuda[:N] (default: auto)"


def add_device_options(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--batch-size``, the same for every job command."""
    parser.add_argument("--batch-size", type=int, default=8, help="images per device batch (default: 8)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)


QUALITY_HELP = ("quality level of a variable-rate model, 1 (fewest bits) .. n; default: the model's default; "
                "see `ncpipe models`")


def _cluster(args: argparse.Namespace) -> ClusterConfig:
    return ClusterConfig(address=args.address, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                         executor=args.executor)


def _add_compress(sub) -> None:
    p = sub.add_parser(
        "compress",
        help="compress WebDataset image shards into bitstream shards + Parquet manifest",
        description="Compress every image of the input shards with a learned codec. Per input shard "
        "writes <output>/g0000/shards/<shard>.tar (<key>.ncb bitstreams plus every other member "
        "unchanged) and <output>/g0000/manifest/<shard>.parquet (one row per sample), committed "
        "atomically. Re-running skips committed shards.",
    )
    p.add_argument("inputs", nargs="+", help="shard URLs, brace patterns (data-{000..009}.tar), globs or "
                   "directories; or image files (a folder of images, photos/*.jpg, one.jpg: shards of up to 1000 "
                   "images per folder are made on the fly); local paths, file:// or s3:// (AWS env/config for "
                   "credentials and endpoint)")
    p.add_argument("-o", "--output", required=True, help="archive location (local path or URL), outside the inputs")
    p.add_argument("-m", "--model", default=DEFAULT_MODEL,
                   help=f"registry name or checkpoint path (default: {DEFAULT_MODEL})")
    p.add_argument("--quality", type=int, metavar="Q", help=QUALITY_HELP)
    add_device_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace output made with a different configuration")
    p.add_argument("--no-metrics", action="store_true",
                   help="skip per-image PSNR/MS-SSIM (saves one synthesis per image)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"refuse images declaring more pixels (default: {DEFAULT_MAX_PIXELS})")
    corrdiff = p.add_argument_group("CorrDiff (docs/corrdiff.md)")
    corrdiff.add_argument("--corrdiff", metavar="DECODER_CHECKPOINT",
                          help="also compute this CorrDiff decoder's correction coefficients and write them into "
                          "each bitstream (version 2; about 50 bytes an image); the decoder must be the codec's")
    corrdiff.add_argument("--corrdiff-steps", type=int, help="sampler steps K, one coefficient each (default: the "
                          "decoder's)")
    corrdiff.add_argument("--corrdiff-bits", type=int, help="bits per coefficient b (default: the decoder's)")
    _add_cluster_options(p)
    add_allow_errors(p)
    p.set_defaults(handler=_compress)


def _compress(args: argparse.Namespace) -> int:
    from ncpipe.pipeline.jobs import run_compress

    config = CompressConfig(
        inputs=tuple(args.inputs), output=args.output, model=args.model, quality=args.quality,
        batch_size=args.batch_size, device=args.device, overwrite=args.overwrite, metrics=not args.no_metrics,
        max_pixels=args.max_pixels, corrdiff=args.corrdiff, corrdiff_steps=args.corrdiff_steps,
        corrdiff_bits=args.corrdiff_bits, cluster=_cluster(args),
    )
    summary = run_compress(config)
    print(summary.text())
    return job_exit_status(summary, args.allow_errors)


def _add_decompress(sub) -> None:
    p = sub.add_parser(
        "decompress",
        help="restore bitstream shards (or a whole archive) to image shards or files",
        description="Decode every <key>.ncb back to an image under its source's name (<key>.jpg as JPEG, "
        "<key>.png as PNG, ...; see --format); every other member is restored unchanged. "
        "Bitstreams are decoded with the model whose SHA-256 they carry (found in the model registry, "
        "or given with --model); one that cannot be decoded is written through unchanged with an error row.",
    )
    p.add_argument("inputs", nargs="+", help="an archive (its current generation is read), a generation "
                   "directory, or bitstream shard URLs/patterns")
    p.add_argument("-o", "--output", required=True, help="where restored shards (or directories) go")
    p.add_argument("--to", choices=("shards", "directory"), default="shards",
                   help="write tar shards (default) or plain files under <output>/<shard>/")
    p.add_argument("--format", choices=RESTORE_CHOICES, default="original",
                   help="original (default): each image in its source's format and extension (JPEG stays .jpg, "
                   "PNG stays .png; PNG where the archive's manifest does not say); png or webp-lossless: every "
                   "image in that format")
    p.add_argument("--jpeg-quality", type=int, default=DEFAULT_RESTORE_QUALITY, metavar="Q",
                   help=f"quality 1..100 of JPEG (and lossy WebP) restores (default: {DEFAULT_RESTORE_QUALITY})")
    p.add_argument("--png-level", type=int, default=DEFAULT_PNG_LEVEL, metavar="L",
                   help=f"zlib level 0..9 of PNG restores: {DEFAULT_PNG_LEVEL} (default) favours speed, 9 size; "
                   "the pixels are the same at every level")
    p.add_argument("-m", "--model",
                   help="checkpoint or registry name to decode with (default: the one each bitstream names)")
    p.add_argument("--refiner", help="NC-Diffusion refiner checkpoint applied to the codec's reconstruction "
                   "(trained for that codec; see ncpipe train refiner)")
    p.add_argument("--refiner-steps", "--steps", dest="refiner_steps", type=int, default=4, metavar="K",
                   help="refiner sampler steps K (default: 4; --steps is its older name)")
    p.add_argument("--guidance", type=float, default=0.0,
                   help="zero-shot latent-consistency guidance strength S in [0, 2] (default: 0, off)")
    p.add_argument("--decoder", choices=("codec", "corrdiff"), default="codec",
                   help="codec: the end-to-end decoder (default); corrdiff: the CorrDiff diffusion decoder, corrected "
                   "by the coefficients in each bitstream (needs --corrdiff)")
    p.add_argument("--corrdiff", metavar="DECODER_CHECKPOINT",
                   help="the CorrDiff decoder the archive was compressed for (compress --corrdiff)")
    p.add_argument("--perception", type=float, default=0.5,
                   help="CorrDiff's distortion-perception knob p in [0, 1]: 0 = the codec's reconstruction, 0.5 = "
                   "as the encoder optimised (default), 1 = the uncorrected diffusion sample")
    add_device_options(p)
    p.add_argument("--overwrite", action="store_true", help="clear the output location first")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="refuse bitstreams declaring more pixels")
    _add_cluster_options(p)
    add_allow_errors(p)
    p.set_defaults(handler=_decompress)


def _decompress(args: argparse.Namespace) -> int:
    from ncpipe.pipeline.jobs import run_decompress

    config = DecompressConfig(
        inputs=tuple(args.inputs), output=args.output, model=args.model, to=args.to, image_format=args.format,
        jpeg_quality=args.jpeg_quality, png_level=args.png_level, refiner=args.refiner,
        refine_steps=args.refiner_steps, guidance=args.guidance, decoder=args.decoder, corrdiff=args.corrdiff,
        perception=args.perception, batch_size=args.batch_size, device=args.device, overwrite=args.overwrite,
        max_pixels=args.max_pixels, cluster=_cluster(args),
    )
    summary = run_decompress(config)
    print(summary.text())
    return job_exit_status(summary, args.allow_errors)


def _add_recompress(sub) -> None:
    p = sub.add_parser(
        "recompress",
        help="re-encode an archive's samples with a newer model, as a new generation",
        description="Select samples of the archive's current generation by policy (any of the conditions "
        "given; none: every sample not already coded by --model at its --quality), re-encode them from their "
        "originals when those are reachable or else by transcoding the old bitstreams, write a complete new "
        "generation with lineage columns in its manifest, and switch CURRENT to it. A run with nothing "
        "to do changes nothing.",
    )
    p.add_argument("archive", help="the archive root (holding CURRENT)")
    p.add_argument("-m", "--model", required=True, help="target model: registry name or checkpoint path")
    p.add_argument("--quality", type=int, metavar="Q", help="re-encode at this " + QUALITY_HELP)
    p.add_argument("--older-than-model", help="policy: samples coded by a model released before this one")
    p.add_argument("--min-psnr", type=float, help="policy: samples whose PSNR is below this (dB)")
    p.add_argument("--max-bpp", type=float, help="policy: samples whose bpp is above this")
    p.add_argument("--quality-above", type=int, metavar="Q",
                   help="policy: samples coded at a quality level above Q (re-encode them at a lower --quality)")
    p.add_argument("--originals", help="prefix holding the original shards (default: the URLs in the manifest)")
    p.add_argument("--transcode", action="store_true", help="never read originals; decode the old bitstreams")
    p.add_argument("--decode-model", action="append", default=[], metavar="MODEL",
                   help="an old model to transcode with that is not in the registry (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="list what would change and the projected bytes")
    add_device_options(p)
    _add_cluster_options(p)
    add_allow_errors(p)
    p.set_defaults(handler=_recompress)


def _recompress(args: argparse.Namespace) -> int:
    from ncpipe.pipeline.jobs import run_recompress

    summary = run_recompress(RecompressConfig(
        archive=args.archive, model=args.model, quality=args.quality, older_than_model=args.older_than_model,
        min_psnr=args.min_psnr, max_bpp=args.max_bpp, quality_above=args.quality_above, originals=args.originals,
        transcode_only=args.transcode, decode_models=tuple(args.decode_model), dry_run=args.dry_run,
        batch_size=args.batch_size, device=args.device, cluster=_cluster(args),
    ))
    print(summary.text())
    return job_exit_status(summary, args.allow_errors)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="compress the shipped sample shards with the default model, then restore them",
                       description="Runs compress on the sample shards that come with ncpipe (samples/shards/*.tar) "
                       f"with model {DEFAULT_MODEL} into <output>/archive, then decompress into <output>/restored.")
    p.add_argument("-o", "--output", default="out/demo", help="demo output folder (default: out/demo)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    from ncpipe.pipeline.jobs import run_compress, run_decompress

    archive, restored = f"{args.output}/archive", f"{args.output}/restored"
    compressed = run_compress(CompressConfig(inputs=(str(demo_shards_dir()),), output=archive, device=args.device,
                                             overwrite=True))
    print("== compress ==")
    print(compressed.text())
    restore = run_decompress(DecompressConfig(inputs=(archive,), output=restored, device=args.device, overwrite=True))
    print("== decompress ==")
    print(restore.text())
    print(f"\nmanifest:  ncpipe manifest {archive}\nrestored:  {restored}/*.tar")
    return max(job_exit_status(compressed), job_exit_status(restore))


def _add_manifest(sub) -> None:
    p = sub.add_parser(
        "manifest", help="the current generation's manifest of an archive, as CSV or Parquet",
        description="Reads every manifest part of the generation CURRENT names (one row per input sample; "
        "earlier generations are left out, so no sample counts twice) and writes it to --output (.parquet or "
        ".csv) or as CSV to stdout. --schema lists the columns with their units and meanings. In Python: "
        "ncpipe.api.open_archive(ARCHIVE).manifest().",
    )
    p.add_argument("archive", nargs="?", help="the archive root (holding CURRENT); local path or URL")
    p.add_argument("-o", "--output", help="write to this file: .parquet or .csv (default: CSV to stdout)")
    p.add_argument("--columns", help="comma-separated columns to keep (default: all)")
    p.add_argument("--schema", action="store_true", help="list the columns, their units and meanings, and exit")
    p.set_defaults(handler=_manifest)


def _manifest(args: argparse.Namespace) -> int:
    from ncpipe.api import open_archive
    from ncpipe.manifest import MANIFEST_SCHEMA, describe_schema, write_table

    if args.schema:
        print(describe_schema(MANIFEST_SCHEMA))
        return 0
    if not args.archive:
        raise ConfigError("give the archive: ncpipe manifest ARCHIVE")
    archive = open_archive(args.archive)
    columns = [c.strip() for c in args.columns.split(",")] if args.columns else None
    unknown = sorted(set(columns or ()) - set(MANIFEST_SCHEMA.names))
    if unknown:
        raise ConfigError(f"--columns: no column {', '.join(unknown)}; see `ncpipe manifest --schema ARCHIVE`")
    table = archive.manifest(columns)
    log.info("%s: generation %s, %d rows", args.archive, archive.generation, table.num_rows)
    write_table(table, args.output or sys.stdout.buffer)
    return 0


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list the model registry")
    p.set_defaults(handler=_models)


def _models(args: argparse.Namespace) -> int:
    from ncpipe.models.registry import DECODER_FILES, list_models

    codecs = list_models()
    if not codecs:
        log.warning("no models found: add folders holding <name>/card.json to NCPIPE_MODEL_DIRS, or name a model "
                    "store with NCPIPE_MODEL_STORE")
    for ref in codecs:
        card = ref.card or {}
        print(f"{ref.name:32s} {card.get('arch', '?'):16s} {_rate_text(card):26s} {_measured_text(card):42s} "
              f"sha256 {ref.expected_sha256[:12]}")
        for level in ((card.get("evaluations") or [{}])[0].get("qualities") or ()):
            print(f"{'':32s} {'':16s} {'  quality ' + str(level['quality']):26s} "
                  f"{level['bpp']:.3f} bpp {level['psnr']:.2f} dB")
    for kind in DECODER_FILES:
        for ref in list_models(kind):
            codecs = ", ".join(c.get("name") or c["sha256"][:12] for c in ref.card["codecs"])
            print(f"{ref.name:32s} {kind:16s} for {codecs:52s} sha256 {ref.expected_sha256[:12]}")
    return 0


def _rate_text(card: dict) -> str:
    quality = card.get("quality")
    if quality:
        return f"quality 1..{len(quality['lambdas'])} (default {quality['default']})"
    return f"λ={card.get('rate', {}).get('lambda', '?'):<8.4g}"


def _measured_text(card: dict) -> str:
    """The card's first measurement (a variable-rate model's at its default quality)."""
    measured = (card.get("evaluations") or [{}])[0]
    if not measured:
        return "not evaluated"
    at = f" at quality {measured['default_quality']}" if measured.get("default_quality") else ""
    return f"{measured['dataset']}: {measured['bpp']:.3f} bpp {measured['psnr']:.2f} dB{at}"


# Each command family registers its own subcommands: ``register(subparsers)`` in these modules.
COMMAND_MODULES = (
    "ncpipe.cli.train",
    "ncpipe.cli.evaluate",
    "ncpipe.cli.verify",
    "ncpipe.cli.operations",
    "ncpipe.cli.refiner",
    "ncpipe.cli.corrdiff",
)
CORE_COMMANDS: Sequence[Callable] = (_add_compress, _add_decompress, _add_recompress, _add_demo, _add_manifest,
                                     _add_models)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ncpipe",
        description="Compress image archives (WebDataset shards) with learned codecs on Ray, "
        "restore them, train and evaluate the models.",
    )
    parser.add_argument("--version", action="version", version=f"ncpipe {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and tracebacks of errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in CORE_COMMANDS:
        add(sub)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # Third-party debug logs carry request headers (botocore logs access key ids): keep them out; and
    # Pillow's list every chunk of every image decoded.
    for noisy in ("botocore", "boto3", "s3fs", "aiobotocore", "urllib3", "fsspec", "PIL"):
        logging.getLogger(noisy).setLevel(max(level, logging.INFO))
    try:
        return args.handler(args)
    except (NcpipeError, FileNotFoundError) as err:
        # What the user can act on: one line (the message says what to do); the traceback only with -v.
        log.error("%s", err, exc_info=args.verbose)
        return EXIT_USAGE
    except KeyboardInterrupt:
        log.error("interrupted; re-running the same command resumes")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
