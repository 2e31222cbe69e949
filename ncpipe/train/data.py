"""Training images: loaded once into memory, served as random crops."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from ncpipe.images import IMAGE_EXTENSIONS, ImageRefused, decode_image

log = logging.getLogger(__name__)


def list_image_files(roots: Iterable[str]) -> list[Path]:
    """Image files under each root (a file or a directory, searched recursively), sorted."""
    files: list[Path] = []
    for root in roots:
        path = Path(root)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(
                p for p in sorted(path.rglob("*")) if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
            )
        else:
            raise FileNotFoundError(f"training data {root!r} is neither a file nor a directory")
    if not files:
        raise ValueError(f"no images found under {list(roots)}")
    return files


def load_training_images(roots: Iterable[str], min_side: int) -> list[np.ndarray]:
    """Decode every usable image (HxWx3 uint8); too-small and refused ones are skipped."""
    images = []
    for file in list_image_files(roots):
        try:
            image = decode_image(file.read_bytes(), file.suffix.lstrip(".")).pixels
        except ImageRefused as err:
            log.warning("skipping %s: %s", file, err)
            continue
        if min(image.shape[:2]) >= min_side:
            images.append(image)
    if not images:
        raise ValueError(f"no training image has both sides >= {min_side} px")
    return images


class RandomCrops:
    """Random square crops with horizontal flips, drawn from a seeded generator."""

    def __init__(self, images: list[np.ndarray], crop: int, seed: int):
        self.images = images
        self.crop = crop
        self.rng = np.random.default_rng(seed)

    def batch(self, size: int) -> torch.Tensor:
        """(size, 3, crop, crop) float32 in [0, 1]."""
        crops = np.empty((size, self.crop, self.crop, 3), dtype=np.uint8)
        for i in range(size):
            image = self.images[self.rng.integers(len(self.images))]
            top = self.rng.integers(image.shape[0] - self.crop + 1)
            left = self.rng.integers(image.shape[1] - self.crop + 1)
            crop = image[top : top + self.crop, left : left + self.crop]
            crops[i] = crop[:, ::-1] if self.rng.random() < 0.5 else crop
        return torch.from_numpy(crops).permute(0, 3, 1, 2).float().div_(255.0)
