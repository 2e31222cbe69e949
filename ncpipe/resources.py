"""Where the files ncpipe ships live: the model registry's built-in folder and the demo's sample shards.

In a checkout they are the repository's ``models/`` (every released model) and ``samples/shards/``.
An installed wheel carries the default model and the sample shards inside the package, under
``ncpipe/shipped/`` (pyproject.toml maps those same folders there, so the repository holds one copy).
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_SHIPPED = _PACKAGE / "shipped"


def _checkout() -> Path | None:
    """The repository root when ncpipe runs from a checkout (editable install, or on sys.path)."""
    root = _PACKAGE.parent
    return root if (root / "pyproject.toml").is_file() and (root / "models").is_dir() else None


def shipped_models_dir() -> Path | None:
    """The registry folder that comes with ncpipe (None if neither a checkout nor the wheel has one)."""
    root = _checkout()
    folder = root / "models" if root else _SHIPPED / "models"
    return folder if folder.is_dir() else None


def demo_shards_dir() -> Path:
    """The sample shards ``ncpipe demo`` compresses."""
    root = _checkout()
    return (root / "samples" if root else _SHIPPED / "samples") / "shards"
