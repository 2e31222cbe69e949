"""Local image files named by the user: a file, a folder (searched recursively) or a glob.

Evaluation, training and release cards all take images this way; one listing rule means
the same folder gives the same images, in the same order, to each of them.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Iterable

from ncpipe.images import IMAGE_EXTENSIONS
from ncpipe.io.urls import InputError, is_image_name

GLOB_CHARS = frozenset("*?[")


def is_image_file(path: Path) -> bool:
    return path.is_file() and is_image_name(path.name)


def images_under(folder: Path) -> list[Path]:
    """Image files below ``folder`` at any depth, sorted by path."""
    return sorted(p for p in folder.rglob("*") if is_image_file(p))


def list_image_files(roots: Iterable[str | Path], limit: int | None = None) -> list[Path]:
    """Image files of each root (a file, a folder, or a glob), in order; the first ``limit`` when one is given."""
    roots = [str(r) for r in roots]
    files: list[Path] = []
    for root in roots:
        files.extend(_root_images(root))
    if not files:
        raise InputError(f"no image files (.{', .'.join(sorted(IMAGE_EXTENSIONS))}) under {', '.join(roots)}")
    return files[:limit] if limit else files


def _root_images(root: str) -> list[Path]:
    if GLOB_CHARS & set(root):
        return sorted(p for p in map(Path, glob.glob(root, recursive=True)) if is_image_file(p))
    path = Path(root)
    if path.is_dir():
        return images_under(path)
    if path.is_file():
        return [path]
    raise InputError(f"{root} does not exist: give an image file, a folder of images or a glob")
