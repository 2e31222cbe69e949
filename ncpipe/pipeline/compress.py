"""Compressing one shard: the worker a codec actor runs, with no Ray in it.

::

    tar shard ─read_ahead─► samples ─decode pool─► RGB pixels ─ShapeBatcher─► batches
      ─► device: g_a, h_a, exact h_s, (g_s + metrics) ─► coder threads: rANS per chunk
         (with --corrdiff: the CorrDiff encoder's K-step sampler ─► coefficients ─► v2 extension)
      ─► output tar (<key>.ncb + carried members) + manifest rows ─► atomic commit

A sample whose image cannot be coded (or that has none, or was damaged in the tar) is
written through unchanged and gets an error row: nothing in the input is lost. The
output shard, then the manifest part, then the commit marker are committed atomically,
in that order; a shard counts as done only once its marker exists.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Protocol

import numpy as np

from ncpipe import metrics
from ncpipe.bitstream import CorrectionCoefficients, metadata_extensions
from ncpipe.codec import AnalysedBatch, LearnedCodec, PendingBitstream, padded_shape
from ncpipe.config import CompressConfig
from ncpipe.diffusion.corrdiff import CorrDiffDecoder, attach_corrections, corrections_for_images
from ncpipe.images import DecodedImage, ImageRefused, decode_image, is_image_member
from ncpipe.io.image_shards import iter_shard_samples
from ncpipe.io.storage import atomic_writer
from ncpipe.io.tar_reader import Sample, ShardUnreadable, TarMember
from ncpipe.io.tar_writer import TarShardWriter
from ncpipe.io.urls import redact
from ncpipe.manifest import (
    STATUS_ERROR,
    STATUS_OK,
    ManifestRow,
    carried_accounting,
    member_sha256,
    printable_name,
    write_manifest_part,
)
from ncpipe.pipeline.layout import BITSTREAM_EXTENSION, write_commit_marker
from ncpipe.pipeline.stages import ShapeBatcher, map_ordered, read_ahead

log = logging.getLogger(__name__)

EMPTY_SHARD_ERROR = "empty shard: the tar holds no samples"


@dataclass(frozen=True)
class ShardTask:
    """One input shard and where its outputs go."""

    input_url: str
    stem: str
    shard_url: str
    manifest_url: str
    commit_url: str
    job_id: str
    fingerprint: str
    generation: str
    attempt: int = 1
    files: tuple[str, ...] = ()  # image files read as its samples (ncpipe.io.image_shards); empty: a tar


@dataclass
class ShardStats:
    """What a worker reports back for a committed shard."""

    stem: str
    samples: int = 0
    ok: int = 0
    errors: int = 0
    seconds: float = 0.0
    shard_error: str | None = None


@dataclass
class Prepared:
    """A sample ready for the encoder, or to be written through (``error`` / ``kept_row``)."""

    sample: Sample
    image_member: TarMember | None = None
    image: DecodedImage | None = None
    error: str | None = None
    kept_row: ManifestRow | None = None  # already coded: written through with this row
    finish_row: Callable[[ManifestRow], ManifestRow] | None = None  # the source's last word on the new row


class SampleSource(Protocol):
    """Where a shard worker's samples come from: an input shard, or a previous generation."""

    def items(self, task: ShardTask, pool: ThreadPoolExecutor) -> Iterator[Prepared]: ...

    def close(self) -> None: ...


class InputShardSamples:
    """The input shard's samples (a tar, or image files), decoded on the pool, in order."""

    def __init__(self, config: CompressConfig):
        self.config = config

    def items(self, task: ShardTask, pool: ThreadPoolExecutor) -> Iterator[Prepared]:
        depth = self.config.batch_size
        samples = read_ahead(iter_shard_samples(task.input_url, task.files), depth=4 * depth)
        return map_ordered(lambda s: prepare(s, self.config.max_pixels), samples, pool, window=2 * depth)

    def close(self) -> None:
        """Holds nothing: the pool it decodes on is the worker's."""


@dataclass
class _InflightBatch:
    items: list[Prepared]
    analysed: AnalysedBatch
    pending: list[PendingBitstream]
    scores: list[tuple[float | None, float | None]]  # (PSNR, MS-SSIM) of each item
    started: float
    corrections: tuple[CorrectionCoefficients, ...] | None = None  # CorrDiff's, one per item


def choose_image_member(sample: Sample) -> TarMember | None:
    """The member to code: the first whose whole extension is an image type.

    ``seg.png``-style members (masks, depth maps) are not photos and stay lossless."""
    return next((m for m in sample.members if is_image_member(m.extension)), None)


def prepare(sample: Sample, max_pixels: int) -> Prepared:
    """Decode the sample's image or say why it cannot be coded (runs on the decode pool)."""
    if sample.error:
        return Prepared(sample, error=sample.error)
    member = choose_image_member(sample)
    if member is None:
        kinds = ", ".join(m.extension for m in sample.members) or "none"
        return Prepared(sample, error=f"no image member to code (members: {kinds})")
    if any(m.extension == BITSTREAM_EXTENSION for m in sample.members):
        return Prepared(sample, member, error=f"sample already has a .{BITSTREAM_EXTENSION} member")
    try:
        return Prepared(sample, member, decode_image(member.data, member.extension, max_pixels))
    except ImageRefused as err:
        return Prepared(sample, member, error=str(err))


class ShardCompressor:
    """Runs :class:`ShardTask`\\ s with one resident codec, coding what its sample source hands over."""

    def __init__(
        self,
        config: CompressConfig,
        codec: LearnedCodec,
        model_id: str,
        decode_threads: int,
        on_progress: Callable[[int], None] = lambda samples: None,
        corrdiff: CorrDiffDecoder | None = None,
        source: SampleSource | None = None,
    ):
        self.config = config
        self.codec = codec
        self.model_id = model_id
        self.decode_pool = ThreadPoolExecutor(decode_threads, thread_name_prefix="decode")
        self.on_progress = on_progress
        self.corrdiff = corrdiff  # when given, every bitstream carries its correction coefficients
        self.source = source or InputShardSamples(config)

    def run(self, task: ShardTask) -> ShardStats:
        started = time.perf_counter()
        stats = ShardStats(task.stem)
        rows: list[ManifestRow] = []
        self._reported = 0
        try:
            with atomic_writer(task.shard_url) as handle, TarShardWriter(handle) as writer:
                self._encode_items(task, self.source.items(task, self.decode_pool), writer, rows)
        except ShardUnreadable as err:
            # The shard itself is unusable: record it once; an empty output shard keeps
            # the layout uniform for readers.
            stats.shard_error = redact(str(err))
            rows = [self._shard_error_row(task, stats.shard_error)]
            with atomic_writer(task.shard_url) as handle, TarShardWriter(handle):
                pass
        if not rows:  # an empty tar: one row says so, or the input would leave no trace
            rows = [dataclasses.replace(self._shard_error_row(task, ""), error=EMPTY_SHARD_ERROR)]
        write_manifest_part(rows, task.manifest_url, self._part_metadata(task))
        self.on_progress(len(rows) - self._reported)
        stats.samples = len(rows)
        stats.errors = sum(row.status == STATUS_ERROR for row in rows)
        stats.ok = stats.samples - stats.errors
        stats.seconds = time.perf_counter() - started
        self._commit(task, stats, carried_accounting(row.carried_sha256 for row in rows))
        return stats

    def _encode_items(self, task: ShardTask, items: Iterable[Prepared], writer: TarShardWriter,
                      rows: list[ManifestRow]) -> None:
        batcher: ShapeBatcher[Prepared] = ShapeBatcher(self.config.batch_size)
        inflight: deque[_InflightBatch] = deque()
        for item in items:
            if item.kept_row is not None:
                self._write_kept(task, item, writer, rows)
                continue
            if item.error is not None:
                self._write_passthrough(task, item, writer, rows)
                continue
            for batch in batcher.add(padded_shape(item.image.height, item.image.width), item):
                inflight.append(self._start_batch(batch))
                # Keep one batch coding on the CPU while the next runs on the device.
                while len(inflight) > 1:
                    self._finish_batch(task, inflight.popleft(), writer, rows)
                    self._report_progress(len(rows))
        for batch in batcher.flush():
            inflight.append(self._start_batch(batch))
        while inflight:
            self._finish_batch(task, inflight.popleft(), writer, rows)

    def _report_progress(self, finished: int) -> None:
        self.on_progress(finished - self._reported)
        self._reported = finished

    def _start_batch(self, items: list[Prepared]) -> _InflightBatch:
        started = time.perf_counter()
        analysed = self.codec.analyse([item.image.pixels for item in items], reconstruct=self.config.metrics,
                                      quality=self.config.quality)
        scores = self._scores(items, analysed)
        pending = [
            self.codec.submit_entropy_coding(analysed, i, item.image.source_mode,
                                             metadata_extensions(item.image.metadata))
            for i, item in enumerate(items)
        ]
        return _InflightBatch(items, analysed, pending, scores, started, self._corrections(items, analysed))

    def _corrections(self, items: list[Prepared],
                     analysed: AnalysedBatch) -> tuple[CorrectionCoefficients, ...] | None:
        """CorrDiff's coefficients (the encoder runs the decoder's sampler against the originals), or None."""
        if self.corrdiff is None:
            return None
        return corrections_for_images(
            self.corrdiff, self.codec, analysed, [item.image.pixels for item in items],
            [item.sample.key for item in items], self.config.corrdiff_steps, self.config.corrdiff_bits,
        )

    def _scores(self, items: list[Prepared], analysed: AnalysedBatch) -> list[tuple[float | None, float | None]]:
        if analysed.reconstructions is None:
            return [(None, None)] * len(items)
        scores = []
        for item, x_hat in zip(items, analysed.reconstructions):
            reference = metrics.to_unit_float(item.image.pixels).to(x_hat.device)
            received = metrics.quantize_8bit(x_hat)[None]
            scores.append(
                (float(metrics.psnr(reference, received)[0]), float(metrics.ms_ssim(reference, received)[0]))
            )
        return scores

    def _finish_batch(self, task: ShardTask, batch: _InflightBatch, writer: TarShardWriter,
                      rows: list[ManifestRow]) -> None:
        bitstreams = [pending.result() for pending in batch.pending]
        seconds_each = (time.perf_counter() - batch.started) / len(batch.items)
        identity = self.codec.model.identity
        quality = batch.analysed.quality
        rate = self.codec.model.rate_of(quality)
        for index, (item, data, (psnr, ms_ssim)) in enumerate(zip(batch.items, bitstreams, batch.scores)):
            sample, image = item.sample, item.image
            data, corrdiff_columns = self._with_corrections(data, batch, index)
            carried, digests = self._write_coded(item, data, writer)
            rows.append(
                ManifestRow(
                    job_id=task.job_id,
                    source_url=redact(task.input_url),
                    sample_index=sample.index,
                    key=printable_name(sample.key),
                    member=printable_name(item.image_member.name),
                    source_format=image.source_format,
                    source_mode=image.source_mode,
                    source_bytes=len(item.image_member.data),
                    width=image.width,
                    height=image.height,
                    compressed_bytes=len(data),
                    bpp=8.0 * len(data) / (image.width * image.height),
                    psnr=_finite_or_none(psnr),
                    ms_ssim=_finite_or_none(ms_ssim),
                    model_id=self.model_id,
                    model_sha256=identity.sha256,
                    rd_lambda=rate,
                    quality=quality,
                    encode_seconds=seconds_each,
                    carried_members=carried,
                    carried_sha256=digests,
                    output_shard=redact(task.shard_url),
                    generation=task.generation,
                    **corrdiff_columns,
                )
            )
            if item.finish_row is not None:
                rows[-1] = item.finish_row(rows[-1])

    def _with_corrections(self, data: bytes, batch: _InflightBatch, index: int) -> tuple[bytes, dict]:
        """The bitstream with item ``index``'s CorrDiff coefficients attached (version 2), and its manifest columns."""
        if batch.corrections is None:
            return data, {}
        extended = attach_corrections(data, batch.corrections[index])
        return extended, {"corrdiff_sha256": batch.corrections[index].decoder_sha256,
                          "corrdiff_bytes": len(extended) - len(data)}

    def _write_coded(self, item: Prepared, bitstream: bytes, writer: TarShardWriter) -> tuple[list[str], list[str]]:
        """The bitstream takes the image member's place; every other member is carried.
        Returns the carried members' names and digests."""
        carried = []
        for member in item.sample.members:
            if member is item.image_member:
                writer.add(f"{item.sample.key}.{BITSTREAM_EXTENSION}", bitstream)
            else:
                writer.add(member.name, member.data)
                carried.append(member)
        return _names_and_digests(carried)

    def _write_passthrough(self, task: ShardTask, item: Prepared, writer: TarShardWriter,
                           rows: list[ManifestRow]) -> None:
        for member in item.sample.members:
            writer.add(member.name, member.data)
        member = item.image_member
        names, digests = _names_and_digests(item.sample.members)
        rows.append(
            ManifestRow(
                job_id=task.job_id,
                source_url=redact(task.input_url),
                sample_index=item.sample.index,
                key=printable_name(item.sample.key),
                member=printable_name(member.name) if member else None,
                source_bytes=len(member.data) if member else None,
                status=STATUS_ERROR,
                error=redact(item.error),
                passthrough=True,
                carried_members=names,
                carried_sha256=digests,
                output_shard=redact(task.shard_url),
                generation=task.generation,
            )
        )

    def _write_kept(self, task: ShardTask, item: Prepared, writer: TarShardWriter, rows: list[ManifestRow]) -> None:
        """An already coded sample that stays as it is (recompression did not select it)."""
        for member in item.sample.members:
            writer.add(member.name, member.data)
        row = item.kept_row
        if row.carried_sha256 is None:  # a manifest from before digests: record them now
            # (digests already recorded are kept, so damage since then still shows)
            ncb = f"{item.sample.key}.{BITSTREAM_EXTENSION}" if row.status == STATUS_OK else None
            row = dataclasses.replace(
                row, carried_sha256=_names_and_digests([m for m in item.sample.members if m.name != ncb])[1])
        rows.append(dataclasses.replace(row, output_shard=redact(task.shard_url), generation=task.generation))

    def _shard_error_row(self, task: ShardTask, error: str) -> ManifestRow:
        return ManifestRow(
            job_id=task.job_id,
            source_url=redact(task.input_url),
            sample_index=-1,
            key="",
            status=STATUS_ERROR,
            error=f"shard unreadable: {error}",
            carried_sha256=[],
            output_shard=redact(task.shard_url),
            generation=task.generation,
        )

    def _part_metadata(self, task: ShardTask) -> dict:
        identity = self.codec.model.identity
        metadata = {
            "ncpipe_job_id": task.job_id,
            "ncpipe_fingerprint": task.fingerprint,
            "ncpipe_model": {"id": self.model_id, "arch": identity.arch, "sha256": identity.sha256,
                             "rate": identity.rate},
        }
        if self.corrdiff is not None:
            metadata["ncpipe_corrdiff"] = {"id": redact(self.config.corrdiff), "sha256": self.corrdiff.identity(),
                                           "steps": self.config.corrdiff_steps or self.corrdiff.config.steps,
                                           "bits": self.config.corrdiff_bits or self.corrdiff.config.bits}
        return metadata

    def _commit(self, task: ShardTask, stats: ShardStats, carried: dict) -> None:
        write_commit_marker(task.commit_url, task.input_url, task.fingerprint, task.job_id, stem=task.stem,
                            attempt=task.attempt, samples=stats.samples, ok=stats.ok, errors=stats.errors,
                            shard_error=stats.shard_error, seconds=round(stats.seconds, 3), **carried)

    def close(self) -> None:
        self.decode_pool.shutdown(wait=True)
        self.source.close()
        self.codec.close()


def _names_and_digests(members: Iterable[TarMember]) -> tuple[list[str], list[str]]:
    """Carried members as the manifest records them: printable names and SHA-256 digests."""
    members = list(members)
    return [printable_name(m.name) for m in members], [member_sha256(m.data) for m in members]


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and np.isfinite(value) else None
