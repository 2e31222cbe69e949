"""Recompression: re-encode what a policy selects with a newer model, as a new generation.

Selection (on the current generation's manifest): rows coded ``ok`` other than by the
target (a model and its quality level), and — when any policy condition is given — matching
at least one of them (coded by a model released before ``older_than_model``, PSNR below
``min_psnr``, bpp above ``max_bpp``, at a quality level above ``quality_above``). Samples
already coded by the target are never selected again, so repeated runs converge and a run
with nothing to do changes nothing.

Source of the pixels, per selected sample:

- ``original``: the original input shard recorded in the manifest (or found under
  ``--originals``) is still readable: the original image is re-encoded, as by compress.
- ``transcoded``: otherwise the old bitstream is decoded with its own model and the
  result re-encoded; the generation loss (PSNR of the new reconstruction against the
  old one) is recorded in ``psnr_vs_previous``, and ``psnr``/``ms_ssim`` against the
  original stay empty because the original is gone.

Every shard of the current generation is rewritten into the next generation (selected
samples re-encoded, the rest written through with their rows), so each generation is
complete on its own; ``CURRENT`` switches to it in one write once every shard is
committed.
"""

from __future__ import annotations

import dataclasses
import logging
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

from ncpipe.bitstream import BitstreamError, image_metadata
from ncpipe.codec import ModelMismatchError
from ncpipe.codec_cache import CodecCache
from ncpipe.errors import NcpipeError
from ncpipe.images import DecodedImage
from ncpipe.io.storage import exists
from ncpipe.io.tar_reader import Sample, iter_samples
from ncpipe.manifest import STATUS_OK, ManifestRow
from ncpipe.models.registry import find_by_sha256, resolve_model
from ncpipe.pipeline.compress import Prepared, ShardTask, prepare
from ncpipe.pipeline.layout import BITSTREAM_EXTENSION

log = logging.getLogger(__name__)

SOURCE_ORIGINAL = "original"
SOURCE_TRANSCODED = "transcoded"


class RecompressError(NcpipeError, RuntimeError):
    """A shard's bitstreams and its manifest disagree; the shard is left as it was."""


@dataclass(frozen=True)
class CodingTarget:
    """What recompression codes with: a model and the quality level it codes at (0: a fixed-rate model)."""

    sha256: str
    quality: int = 0

    def coded(self, row: dict) -> bool:
        """Whether ``row`` was coded just so; parts written before the quality column existed
        come from fixed-rate models, so their null quality reads as 0."""
        return row["model_sha256"] == self.sha256 and (row["quality"] or 0) == self.quality


@dataclass(frozen=True)
class RecompressPolicy:
    older_than_model: str | None = None
    min_psnr: float | None = None
    max_bpp: float | None = None
    quality_above: int | None = None

    def describe(self) -> str:
        parts = [
            f"model released before {self.older_than_model}" if self.older_than_model else "",
            f"PSNR < {self.min_psnr} dB" if self.min_psnr is not None else "",
            f"bpp > {self.max_bpp}" if self.max_bpp is not None else "",
            f"quality > {self.quality_above}" if self.quality_above is not None else "",
        ]
        chosen = [p for p in parts if p]
        return " or ".join(chosen) if chosen else "every sample not yet coded by the target model at its quality"

    def fingerprint_fields(self) -> dict:
        """The policy as a job fingerprint records it."""
        fields = dataclasses.asdict(self)
        if self.quality_above is None:  # left out, so recompressions without it keep the fingerprints they had
            del fields["quality_above"]
        return fields


def release_date(sha256: str) -> str | None:
    ref = find_by_sha256(sha256)
    return (ref.card or {}).get("released") if ref else None


def is_selected(row: dict, target: CodingTarget, policy: RecompressPolicy, cutoff: str | None) -> bool:
    """Whether ``row`` (a manifest row as a dict) is re-encoded under ``policy``."""
    if row["status"] != STATUS_OK or target.coded(row):
        return False
    conditions = []
    if policy.older_than_model:
        released = release_date(row["model_sha256"])
        # A model this registry does not know is treated as older than any it knows.
        conditions.append(released is None or (cutoff is not None and released < cutoff))
    if policy.min_psnr is not None:
        conditions.append(row["psnr"] is not None and row["psnr"] < policy.min_psnr)
    if policy.max_bpp is not None:
        conditions.append(row["bpp"] is not None and row["bpp"] > policy.max_bpp)
    if policy.quality_above is not None:
        conditions.append(row["quality"] is not None and row["quality"] > policy.quality_above)
    return any(conditions) if conditions else True


def policy_cutoff(policy: RecompressPolicy) -> str | None:
    if not policy.older_than_model:
        return None
    ref = resolve_model(policy.older_than_model)
    released = (ref.card or {}).get("released")
    if released is None:
        raise ValueError(f"model {policy.older_than_model!r} has no release date in its card")
    return released


def original_location(source_url: str, originals: str | None) -> str:
    """Where an original shard is: as recorded, or the same file name under ``originals``."""
    if originals is None:
        return source_url
    return posixpath.join(originals.rstrip("/"), posixpath.basename(source_url))


@dataclass(frozen=True)
class RecompressTask(ShardTask):
    """A previous-generation shard, its manifest rows (in shard order) and which to re-encode."""

    previous_rows: tuple[ManifestRow, ...] = ()
    selected: frozenset[int] = frozenset()  # positions in previous_rows
    originals: str | None = None  # prefix holding the original shards, or None: as recorded
    transcode_only: bool = False


class PreviousGeneration:
    """The sample source of a recompression: a previous generation's shard, sample by sample,
    each kept with its row, or re-prepared from its original or its old bitstream as selected."""

    def __init__(self, models: CodecCache, max_pixels: int):
        self.models = models
        self.max_pixels = max_pixels

    def close(self) -> None:
        self.models.close()

    def items(self, task: RecompressTask, pool: ThreadPoolExecutor) -> Iterator[Prepared]:
        """In shard order; the pool is not used (selected samples are few and decoded where found)."""
        originals = {} if task.transcode_only else self._original_samples(task)
        samples = iter_samples(task.input_url)
        for position, row in enumerate(task.previous_rows):
            if row.sample_index < 0:  # a shard-level error row has no sample in the shard
                yield Prepared(Sample(row.key, (), task.input_url, -1), kept_row=row)
                continue
            sample = next(samples, None)
            if sample is None or sample.key != row.key:
                found = "nothing" if sample is None else repr(sample.key)
                raise RecompressError(f"sample {position} of {task.input_url} is {found}, manifest says {row.key!r}")
            if position not in task.selected:
                yield Prepared(sample, kept_row=row)
            elif row.sample_index in originals:
                yield self._from_original(originals[row.sample_index], row)
            else:
                yield self._transcoded(sample, row)
        if next(samples, None) is not None:
            raise RecompressError(f"{task.input_url} holds more samples than its manifest part")

    def _original_samples(self, task: RecompressTask) -> dict[int, Sample]:
        """The selected samples' originals, from every original shard that is still readable."""
        wanted: dict[str, set[int]] = {}
        for position in task.selected:
            row = task.previous_rows[position]
            wanted.setdefault(original_location(row.source_url, task.originals), set()).add(row.sample_index)
        found: dict[int, Sample] = {}
        for url, indexes in wanted.items():
            if not exists(url):
                log.info("original shard %s is not reachable: transcoding its samples", url)
                continue
            found.update((s.index, s) for s in iter_samples(url) if s.index in indexes and not s.error)
        return found

    def _lineage(self, row: ManifestRow, source: str) -> dict:
        return {
            "source_url": row.source_url,
            "sample_index": row.sample_index,
            "previous_model_sha256": row.model_sha256,
            "previous_compressed_bytes": row.compressed_bytes,
            "recompress_source": source,
        }

    def _from_original(self, original: Sample, row: ManifestRow) -> Prepared:
        item = prepare(original, self.max_pixels)
        if item.error is not None:  # the original changed or broke since: keep what we have
            log.warning("original of %s is no longer codable (%s): kept as it was", row.key, item.error)
            return Prepared(original, kept_row=row)
        lineage = self._lineage(row, SOURCE_ORIGINAL)
        return dataclasses.replace(item, finish_row=lambda new: dataclasses.replace(new, **lineage))

    def _transcoded(self, sample: Sample, row: ManifestRow) -> Prepared:
        member = next(m for m in sample.members if m.extension == BITSTREAM_EXTENSION)
        try:
            header, pixels = self.models.decode_pixels(member.data, self.max_pixels)
        except (BitstreamError, ModelMismatchError) as err:
            log.warning("cannot transcode %s (%s): kept as it was", row.key, err)
            return Prepared(sample, kept_row=row)
        # the old bitstream's EXIF / ICC / XMP travel on into the new one
        image = DecodedImage(pixels, row.source_format or "", header.source_mode, image_metadata(member.data))
        lineage = {
            **self._lineage(row, SOURCE_TRANSCODED),
            "member": row.member,
            "source_format": row.source_format,
            "source_bytes": row.source_bytes,
        }
        # Quality is measured against the old reconstruction, not the (unavailable) original.
        return Prepared(sample, member, image, finish_row=lambda new: dataclasses.replace(
            new, **lineage, psnr_vs_previous=new.psnr, psnr=None, ms_ssim=None))
