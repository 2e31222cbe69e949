"""CLI subcommands of the diffusion decoders (registered by ncpipe.cli and ncpipe.train.commands)."""


def register(subparsers) -> None:
    """Top-level diffusion subcommands (none yet)."""


def register_train(train_subparsers) -> None:
    """`ncpipe train <refiner>` subcommands (none yet)."""
