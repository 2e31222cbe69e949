"""CLI subcommands of this package (registered by ncpipe.cli)."""


def register(subparsers) -> None:
    """Add this package's subcommands (none yet)."""
