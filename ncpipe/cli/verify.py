"""CLI subcommands of this package (registered by ncpipe.cli): ``ncpipe verify``."""

from __future__ import annotations

import argparse
import json
import os

from ncpipe.images import DEFAULT_MAX_PIXELS


def register(subparsers) -> None:
    """Add ``verify``."""
    p = subparsers.add_parser(
        "verify",
        help="check a compressed archive: every CRC, every bitstream decodes, the manifest matches the shards",
        description="Reads the archive's current generation and checks, per shard: the commit marker, the "
        "manifest part and the output tar agree (every row has its members, no member is unlisted, "
        "compressed_bytes equals the member's size); every <key>.ncb parses, passes the CRC32 of its header "
        "and of every chunk, and entropy-decodes with the coder's end-state checks (with --full, is also "
        "synthesised); across shards, every input sample appears once and summary.json agrees; no stray "
        "temporary files. Runs in this process (no Ray). Exit status 0: no problem; 1: problems (listed "
        "with shard, key and damaged chunk).",
    )
    p.add_argument("archive", help="archive root (read through CURRENT) or a generation directory; local or URL")
    p.add_argument("-m", "--model", help="registry name or checkpoint to decode with (default: the registry "
                   "model whose SHA-256 the archive records)")
    p.add_argument("--device", default="auto", help="device for the hyper-synthesis and --full synthesis: auto "
                   "(a GPU when there is one), cpu or cuda[:N] (default: auto)")
    p.add_argument("--full", action="store_true", help="also synthesise every image (as a restore would)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="CPU threads checking bitstreams (default: all CPUs)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="refuse bitstreams declaring more pixels")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=_verify)


def _verify(args: argparse.Namespace) -> int:
    from ncpipe.reliability.verify import VerifyOptions, verify_archive

    options = VerifyOptions(full=args.full, max_pixels=args.max_pixels, threads=max(1, args.threads))
    report = verify_archive(args.archive, model=args.model, device=args.device, options=options)
    print(json.dumps(report.to_json(), indent=2) if args.json else report.text())
    return 0 if report.ok else 1
