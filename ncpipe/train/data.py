"""Training images: loaded once into memory, served as random crops.

A training ``data`` entry is either local images or WebDataset shards::

    entry                                   read as
    ------------------------------------    ------------------------------------------------
    photos/            (local folder)       every image file below it; a folder holding no
                                            image but shards (.tar, .tar.gz, ...) is read as shards
    photos/a.png       (local file)         that image
    data-{000..009}.tar, s3://b/x/*.tar,    shards, expanded by ncpipe.io.urls.expand_inputs;
    shards/a.tar, s3://b/x/ (any URL)       every image member of every sample is used
    local glob  photos/*.png                each match: a shard if its name is a shard's, else an image

Everything is decoded to HxWx3 uint8 up front (ncpipe.images rules), so the whole set must
fit in memory: fine for BSDS500/DIV2K-sized sets, not for web-scale archives.
"""

from __future__ import annotations

import glob
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from fsspec.core import split_protocol

from ncpipe.images import ImageRefused, decode_image, is_image_member
from ncpipe.io.image_files import GLOB_CHARS, images_under
from ncpipe.io.tar_reader import iter_samples
from ncpipe.io.urls import expand_inputs, is_shard_name, redact

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingSource:
    """One place images come from: a local image file or a shard URL."""

    kind: str  # "image" or "shard"
    location: str


def is_shard_entry(entry: str) -> bool:
    """Whether a ``data`` entry names shards (a URL, a brace pattern or a shard name) rather than local images."""
    protocol = split_protocol(entry)[0]
    return "{" in entry or protocol is not None or is_shard_name(entry)


def training_sources(entries: Iterable[str]) -> list[TrainingSource]:
    """Resolve ``data`` entries (see the module docstring) into image files and shard URLs, in order."""
    entries = list(entries)
    sources: list[TrainingSource] = []
    for entry in entries:
        if is_shard_entry(entry):
            sources.extend(TrainingSource("shard", url) for url in expand_inputs([entry]))
        elif GLOB_CHARS & set(entry):
            sources.extend(_glob_sources(entry))
        else:
            sources.extend(_local_sources(Path(entry)))
    if not sources:
        raise ValueError(f"no images or shards found under {entries}")
    return sources


def _glob_sources(pattern: str) -> list[TrainingSource]:
    matches = sorted(p for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not matches:
        raise FileNotFoundError(f"training data {pattern!r} matches no file")
    return [TrainingSource("shard" if is_shard_name(p) else "image", p) for p in matches]


def _local_sources(path: Path) -> list[TrainingSource]:
    if path.is_file():
        return [TrainingSource("image", str(path))]
    if not path.is_dir():
        raise FileNotFoundError(f"training data {str(path)!r} is neither a file, a folder nor a shard URL/pattern")
    images = images_under(path)
    if images:
        return [TrainingSource("image", str(p)) for p in images]
    shards = [p for p in sorted(path.rglob("*")) if p.is_file() and is_shard_name(p.name)]
    if not shards:
        raise ValueError(f"training data folder {str(path)!r} holds no image and no shard")
    log.info("%s holds no image files; reading its %d shards", path, len(shards))
    return [TrainingSource("shard", str(p)) for p in shards]


def _decoded(source: TrainingSource) -> Iterator[np.ndarray]:
    """The pixels of every usable image of one source; refused images are logged and skipped."""
    if source.kind == "image":
        path = Path(source.location)
        try:
            yield decode_image(path.read_bytes(), path.suffix.lstrip(".")).pixels
        except ImageRefused as err:
            log.warning("skipping %s: %s", path, err)
        return
    for sample in iter_samples(source.location):
        if sample.error:
            log.warning("skipping sample %s of %s: %s", sample.key, redact(source.location), sample.error)
            continue
        for member in sample.members:
            if not is_image_member(member.extension):
                continue
            try:
                yield decode_image(member.data, member.extension).pixels
            except ImageRefused as err:
                log.warning("skipping %s in %s: %s", member.name, redact(source.location), err)


def load_training_images(roots: Iterable[str], min_side: int) -> list[np.ndarray]:
    """Decode every usable image (HxWx3 uint8) of the ``data`` entries; too-small and refused ones are skipped."""
    images, too_small = [], 0
    sources = training_sources(roots)
    for source in sources:
        for pixels in _decoded(source):
            if min(pixels.shape[:2]) >= min_side:
                images.append(pixels)
            else:
                too_small += 1
    shards = sum(s.kind == "shard" for s in sources)
    log.info("training images: %d loaded from %d files and %d shards (%d smaller than %d px skipped)",
             len(images), len(sources) - shards, shards, too_small, min_side)
    if not images:
        raise ValueError(f"no training image has both sides >= {min_side} px")
    return images


class RandomCrops:
    """Random square crops with horizontal flips, drawn from a seeded generator.

    The decoded images are moved to ``device`` once (as uint8, CHW) and cropped there, so a
    GPU step never waits on host-to-device copies of pixels."""

    def __init__(self, images: list[np.ndarray], crop: int, seed: int, device: torch.device | str = "cpu"):
        self.images = [torch.tensor(im).permute(2, 0, 1).to(device) for im in images]
        self.crop = crop
        self.rng = np.random.default_rng(seed)

    def batch(self, size: int) -> torch.Tensor:
        """(size, 3, crop, crop) float32 in [0, 1], on the images' device."""
        crops = []
        for _ in range(size):
            image = self.images[self.rng.integers(len(self.images))]
            top = int(self.rng.integers(image.shape[1] - self.crop + 1))
            left = int(self.rng.integers(image.shape[2] - self.crop + 1))
            crop = image[:, top : top + self.crop, left : left + self.crop]
            crops.append(crop.flip(2) if self.rng.random() < 0.5 else crop)
        return torch.stack(crops).float().div_(255.0)
