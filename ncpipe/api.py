"""The Python API: open an archive, read its current manifest and its samples, decode a bitstream.

::

    from ncpipe.api import open_archive

    archive = open_archive("out/archive")            # a local path or an s3://... URL
    table = archive.manifest()                       # pyarrow.Table: the current generation's rows
    for sample in archive.samples():                 # every sample of every shard, in order
        image = sample.decode()                      # PIL.Image, with the model the bitstream names
        caption = sample.members.get("json")         # the other members, byte for byte

``decode(data)`` turns the bytes of one ``.ncb`` into a PIL image. Importing this module (or
``ncpipe``) does not import torch; the first decode does.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

from ncpipe.errors import NcpipeError
from ncpipe.images import DEFAULT_MAX_PIXELS
from ncpipe.io.storage import list_files
from ncpipe.io.tar_reader import iter_samples
from ncpipe.io.urls import redact
from ncpipe.manifest import MANIFEST_SCHEMA, read_manifest
from ncpipe.pipeline.layout import BITSTREAM_EXTENSION, ArchiveLayout, GenerationLayout

if TYPE_CHECKING:
    import pyarrow as pa
    from PIL import Image

class NotAnArchiveError(NcpipeError, FileNotFoundError):
    """The location holds no ncpipe archive (no ``CURRENT`` naming a generation)."""


@dataclass(frozen=True)
class ArchiveSample:
    """One sample of an archive: its key and its members by extension (``ncb``: the bitstream)."""

    key: str
    shard: str
    members: dict[str, bytes] = field(repr=False)

    @property
    def bitstream(self) -> bytes | None:
        """The ``.ncb`` member, or None when the sample was stored unchanged (an error row)."""
        return self.members.get(BITSTREAM_EXTENSION)

    def decode(self, model: str | None = None, device: str = "cpu") -> Image.Image:
        """The sample's image (see :func:`decode`)."""
        if self.bitstream is None:
            raise NcpipeError(f"sample {self.key!r} of {redact(self.shard)} has no bitstream: it was stored "
                              "unchanged (its manifest row says why)")
        return decode(self.bitstream, model=model, device=device)


@dataclass(frozen=True)
class Archive:
    """An archive's current generation, as readers see it."""

    root: str
    generation: str

    @property
    def layout(self) -> GenerationLayout:
        return ArchiveLayout(self.root).generation(self.generation)

    def manifest(self, columns: list[str] | None = None) -> pa.Table:
        """Every row of the current generation (one per input sample), in the current schema."""
        table = read_manifest(self.layout.manifest_dir, MANIFEST_SCHEMA)
        return table.select(columns) if columns else table

    def shards(self) -> list[str]:
        """URLs of the current generation's bitstream shards, sorted."""
        return list_files(self.layout.shards_dir, suffix=".tar")

    def samples(self) -> Iterator[ArchiveSample]:
        """Every sample of every shard, in shard then tar order."""
        for shard in self.shards():
            for sample in iter_samples(shard):
                members = {member.extension: member.data for member in sample.members}
                yield ArchiveSample(sample.key, shard, members)


def open_archive(url: str) -> Archive:
    """The archive at ``url`` (its root, the folder holding ``CURRENT``)."""
    current = ArchiveLayout(url).current_generation()
    if not current:
        raise NotAnArchiveError(f"{redact(url)} holds no ncpipe archive (no CURRENT file): give the folder "
                                "that `ncpipe compress -o` wrote")
    return Archive(url, current)


def decode(data: bytes, model: str | None = None, device: str = "cpu",
           max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """One ``.ncb`` bitstream -> a PIL image in its source mode (RGB, or L for grayscale sources).

    ``model``: a registry name or checkpoint path; default: the registry model whose SHA-256 the
    bitstream records. Models stay loaded between calls."""
    from ncpipe.images import restore_image

    header, pixels = _codecs(model, device).decode_pixels(data, max_pixels)
    return restore_image(pixels, header.source_mode)


@functools.lru_cache(maxsize=4)
def _codecs(model: str | None, device: str):
    import torch

    from ncpipe.codec_cache import CodecCache
    from ncpipe.device import resolve_device

    given = (model,) if model else ()
    return CodecCache(resolve_device(device), torch.get_num_threads(), given, only_given=bool(model))
