"""Restoring one bitstream shard: ``<key>.ncb`` back to an image, every other member carried.

The image is written in its source's format under its source's extension (``<key>.jpg`` as
JPEG at ``jpeg_quality``, ``<key>.png`` as PNG, ...), as the archive's manifest part for the
shard recorded them; as PNG where no manifest says (bare bitstream shards), or in the one
format ``image_format`` names.

Each bitstream names the model that wrote it (its SHA-256); the worker loads that model
from the registry on first use (or uses the one given) and keeps it. A bitstream whose
model is not available, or that is damaged, gets an error row and is written through
unchanged, so a restore never loses data.

After the codec's synthesis, an optional diffusion decoder makes the image: the NC-Diffusion
refiner (``--refiner``), or CorrDiff (``--decoder corrdiff``) with the coefficients each
bitstream carries. An image it cannot serve keeps the codec's reconstruction, and its row
says why (``not refined: ...`` / ``not corrdiff-decoded: ...``).
"""

from __future__ import annotations

import dataclasses
import logging
import posixpath
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image

from ncpipe import bitstream as fmt
from ncpipe.codec import LatentSymbols, LearnedCodec, ModelMismatchError, to_uint8_image
from ncpipe.codec_cache import CodecCache
from ncpipe.config import DecompressConfig
from ncpipe.diffusion.corrdiff import CorrDiffMismatchError, corrdiff_decode, load_corrdiff, read_corrections
from ncpipe.diffusion.guidance import GuidanceConfig
from ncpipe.diffusion.refiner import RefinerMismatchError, decoded_batch, load_refiner
from ncpipe.images import DEFAULT_PNG_LEVEL, RESTORE_FORMATS, ImageMetadata, encode_image, restore_image
from ncpipe.io.storage import atomic_writer, exists, write_bytes_atomic
from ncpipe.io.tar_reader import Sample, ShardUnreadable, TarMember, iter_samples
from ncpipe.io.tar_writer import TarShardWriter
from ncpipe.io.urls import join_url, redact
from ncpipe.manifest import STATUS_ERROR, STATUS_OK, RestoreRow, printable_name, read_part, write_restore_part
from ncpipe.pipeline.committed import MANIFEST_ERRORS, SampleCheck, ShardExpectations
from ncpipe.pipeline.compress import ShardStats
from ncpipe.pipeline.layout import BITSTREAM_EXTENSION, write_commit_marker
from ncpipe.pipeline.stages import ShapeBatcher, map_ordered, read_ahead

log = logging.getLogger(__name__)

RESTORED_EXTENSION = "png"


@dataclass(frozen=True)
class RestoreTask:
    input_url: str
    stem: str
    output_url: str  # a tar (to=shards) or a directory (to=directory)
    manifest_url: str
    commit_url: str
    job_id: str
    fingerprint: str
    attempt: int = 1
    source_manifest_url: str | None = None  # the archive's manifest part of this shard: each source's format
    committed: bool = True  # False: the archive has no commit marker for this shard, which is not read


@dataclass(frozen=True)
class RestoreFormats:
    """How each restored image is named and encoded: as its source was (extension and format, from the
    archive's manifest), or one format for every image (``DecompressConfig.image_format``)."""

    choice: str
    quality: int
    sources: dict[str, tuple[str, str]]  # sample key -> (source member's extension, source format)
    png_level: int = DEFAULT_PNG_LEVEL  # zlib level of PNG restores (changes the file's size, never its pixels)

    def encode(self, image: Image.Image, target: tuple[str, str, bool], metadata: ImageMetadata) -> bytes:
        """One restored image as ``target`` (what :meth:`target` gave) says."""
        return encode_image(image, target[1], metadata, self.quality, lossless=target[2], png_level=self.png_level)

    def target(self, key: str) -> tuple[str, str, bool]:
        """(extension, Pillow format, lossless) of one restored image; PNG when its source is unknown."""
        if self.choice == "webp-lossless":
            return "webp", "WEBP", True
        source = self.sources.get(key) if self.choice == "original" else None
        if source and source[1] in RESTORE_FORMATS:
            return source[0], RESTORE_FORMATS[source[1]], False
        return RESTORED_EXTENSION, "PNG", False


def source_formats(manifest_url: str | None) -> dict[str, tuple[str, str]]:
    """Sample key -> (extension, format) of the images a compress manifest part records as coded."""
    if manifest_url is None or not exists(manifest_url):
        return {}
    table = read_part(manifest_url)
    columns = ["key", "member", "source_format", "status"]
    if not set(columns) <= set(table.column_names):  # not a compress manifest: formats unknown, PNG
        return {}
    return {
        row["key"]: (row["member"].rsplit("/", 1)[-1].partition(".")[2], row["source_format"])
        for row in table.select(columns).to_pylist()
        if row["status"] == STATUS_OK and row["member"] and row["source_format"]
    }


@dataclass
class _Parsed:
    sample: Sample
    member: TarMember | None = None
    header: fmt.BitstreamHeader | None = None
    symbols: LatentSymbols | None = None
    codec: LearnedCodec | None = None
    error: str | None = None
    seconds: float = 0.0
    corrections: fmt.CorrectionCoefficients | None = None  # read only when decoding with CorrDiff
    metadata: ImageMetadata = ImageMetadata()  # EXIF / ICC / XMP the source carried (version 4)
    check: SampleCheck | None = None  # against the archive manifest (None: bare shards)

    @property
    def index(self) -> int:
        """The sample's index in the archive manifest (its input position; -1: not listed there), or
        its position in the shard when restoring bare shards."""
        if self.check is None:
            return self.sample.index
        return self.check.expected.sample_index if self.check.expected else -1

    @property
    def problems(self) -> tuple[str, ...]:
        return self.check.problems if self.check else ()


@dataclass(frozen=True)
class _EncodingBatch:
    """A synthesised batch whose restored files are being encoded on the pool."""

    items: list[_Parsed]
    targets: list[tuple[str, str, bool]]  # RestoreFormats.target of each item
    encoded: list[Future]  # the file's bytes, per item
    decode_errors: list[str | None]  # why the decoder asked for was not applied, per item
    started: float


class ShardDecompressor:
    def __init__(
        self,
        config: DecompressConfig,
        device: torch.device,
        threads: int,
        on_progress: Callable[[int], None] = lambda samples: None,
    ):
        self.config = config
        self.on_progress = on_progress
        given = (config.model,) if config.model else ()
        self.models = CodecCache(device, threads, given, only_given=bool(config.model))
        self.refiner = load_refiner(config.refiner, device) if config.refiner else None
        self.corrdiff = load_corrdiff(config.corrdiff, device) if config.decoder == "corrdiff" else None
        self.guidance = GuidanceConfig(strength=config.guidance) if config.guidance else None
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="restore")

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.models.close()

    # -- one shard ------------------------------------------------------------------

    def run(self, task: RestoreTask) -> ShardStats:
        started = time.perf_counter()
        stats = ShardStats(task.stem)
        rows: list[RestoreRow] = []
        expectations = self._expectations(task, rows)
        try:
            if not task.committed:
                raise ShardUnreadable("the archive has no commit marker for it (its job did not finish it)")
            with self._sink(task) as sink:
                self._restore_samples(task, sink, rows, expectations)
        except ShardUnreadable as err:
            stats.shard_error = redact(str(err))
            rows += self._missing_rows(task, expectations, f"shard unreadable: {stats.shard_error}")
        write_restore_part(rows, task.manifest_url, {"ncpipe_job_id": task.job_id})
        stats.samples = len(rows)
        stats.errors = sum(row.status == STATUS_ERROR for row in rows)
        stats.ok = stats.samples - stats.errors
        stats.seconds = time.perf_counter() - started
        write_commit_marker(task.commit_url, task.input_url, task.fingerprint, task.job_id, samples=stats.samples,
                            errors=stats.errors, seconds=round(stats.seconds, 3))
        return stats

    def _sink(self, task: RestoreTask) -> "_TarSink | _DirectorySink":
        if self.config.to == "directory":
            return _DirectorySink(task.output_url)
        return _TarSink(task.output_url)

    def _expectations(self, task: RestoreTask, rows: list[RestoreRow]) -> ShardExpectations | None:
        """What the archive manifest says the shard holds (None for bare shards, or with an error row
        when the part cannot be read)."""
        if task.source_manifest_url is None:
            return None
        try:
            return ShardExpectations.read(task.source_manifest_url)
        except MANIFEST_ERRORS as err:
            rows.append(RestoreRow(task.job_id, redact(task.input_url), -1, "", status=STATUS_ERROR,
                                   error=redact(f"archive manifest part unreadable ({type(err).__name__}: {err}): "
                                                "samples not checked against it")))
            return None

    def _missing_rows(self, task: RestoreTask, expectations: ShardExpectations | None,
                      reason: str) -> list[RestoreRow]:
        """An error row for each sample the manifest lists and the shard did not give (one shard-level
        row without a manifest)."""
        if expectations is None or not expectations.order:
            return [RestoreRow(task.job_id, redact(task.input_url), -1, "", status=STATUS_ERROR, error=reason)]
        return self._unmatched_rows(task, expectations, reason)

    def _unmatched_rows(self, task: RestoreTask, expectations: ShardExpectations, reason: str) -> list[RestoreRow]:
        return [RestoreRow(task.job_id, redact(task.input_url), e.sample_index, e.key, status=STATUS_ERROR,
                           error=reason) for e in expectations.unmatched()]

    def _restore_samples(self, task: RestoreTask, sink, rows: list[RestoreRow],
                         expectations: ShardExpectations | None) -> None:
        formats = RestoreFormats(self.config.image_format, self.config.jpeg_quality,
                                 source_formats(task.source_manifest_url), self.config.png_level)
        samples = read_ahead(iter_samples(task.input_url), depth=4 * self.config.batch_size)
        if expectations is not None:  # matched in archive order, before the pool
            checks = map(expectations.check, samples)
            parsed = map_ordered(lambda c: dataclasses.replace(self._parse(c.sample), check=c), checks, self.pool,
                                 window=2 * self.config.batch_size)
        else:
            parsed = map_ordered(self._parse, samples, self.pool, window=2 * self.config.batch_size)
        batcher: ShapeBatcher[_Parsed] = ShapeBatcher(self.config.batch_size)
        inflight: deque[_EncodingBatch] = deque()
        for item in parsed:
            if item.error is not None or item.member is None:
                self._write_pending(task, inflight, sink, rows)  # after the batches before it, as without overlap
                self._write_through(task, item, sink, rows)
                continue
            # one CorrDiff batch samples with one step count K
            steps = len(item.corrections.indexes) if item.corrections else 0
            key = (item.header.model_sha256, item.header.y_shape, steps)
            for batch in batcher.add(key, item):
                self._advance(task, inflight, self._synthesise(batch, formats), sink, rows)
        for batch in batcher.flush():
            self._advance(task, inflight, self._synthesise(batch, formats), sink, rows)
        self._write_pending(task, inflight, sink, rows)
        if expectations is not None:
            rows += self._unmatched_rows(task, expectations, expectations.missing_reason())
        self.on_progress(len(rows))

    def _parse(self, sample: Sample) -> _Parsed:
        """Entropy-decode a sample's bitstream (runs on the pool)."""
        started = time.perf_counter()
        member = next((m for m in sample.members if m.extension == BITSTREAM_EXTENSION), None)
        if sample.error or member is None:
            return _Parsed(sample, member, error=sample.error)
        try:
            header = fmt.parse_header(member.data, self.config.max_pixels)
            codec = self.models.codec_for(header)
            header, symbols = codec.decode_symbols(member.data, self.config.max_pixels)
            corrections = read_corrections(member.data) if self.corrdiff else None
            metadata = fmt.image_metadata(member.data)
        except (fmt.BitstreamError, ModelMismatchError) as err:
            return _Parsed(sample, member, error=str(err))
        return _Parsed(sample, member, header, symbols, codec, seconds=time.perf_counter() - started,
                       corrections=corrections, metadata=metadata)

    def _advance(self, task: RestoreTask, inflight: deque[_EncodingBatch], batch: _EncodingBatch, sink,
                 rows: list[RestoreRow]) -> None:
        """Queue a synthesised batch and write the one before it: the device synthesises a batch while the
        previous one's images are encoded on the pool (on a CPU, a fair share of a restore's time)."""
        inflight.append(batch)
        self._write_pending(task, inflight, sink, rows, keep=1)

    def _write_pending(self, task: RestoreTask, inflight: deque[_EncodingBatch], sink, rows: list[RestoreRow],
                       keep: int = 0) -> None:
        """Write the oldest synthesised batches until ``keep`` remain in flight."""
        while len(inflight) > keep:
            self._write_batch(task, inflight.popleft(), sink, rows)

    def _synthesise(self, batch: list[_Parsed], formats: RestoreFormats) -> _EncodingBatch:
        """The batch's images from the decoder, handed to the pool to be encoded as restored files."""
        started = time.perf_counter()
        images, decode_errors = self._decode(batch)
        targets = [formats.target(printable_name(item.sample.key)) for item in batch]
        encoded = [
            self.pool.submit(lambda item, x_hat, target: formats.encode(
                restore_image(to_uint8_image(x_hat), item.header.source_mode), target, item.metadata),
                item, x_hat, target)
            for item, x_hat, target in zip(batch, images, targets)
        ]
        return _EncodingBatch(batch, targets, encoded, decode_errors, started)

    def _write_batch(self, task: RestoreTask, pending: _EncodingBatch, sink, rows: list[RestoreRow]) -> None:
        encoded = [future.result() for future in pending.encoded]
        batch, share = pending.items, (time.perf_counter() - pending.started) / len(pending.items)
        for item, data, target, decode_error in zip(batch, encoded, pending.targets, pending.decode_errors):
            name = f"{item.sample.key}.{target[0]}"
            written, refused = sink.write_sample(item.sample, _Replacement(item.member, name, data))
            rows.append(RestoreRow(
                task.job_id, redact(task.input_url), item.index, printable_name(item.sample.key),
                member=printable_name(item.member.name), output=written, width=item.header.width,
                height=item.header.height, model_sha256=item.header.model_sha256,
                decode_seconds=item.seconds + share,
                status=STATUS_ERROR if refused or decode_error or item.problems else STATUS_OK,
                error="; ".join(filter(None, [*item.problems, decode_error, _refused_message(refused)])) or None,
                **self.decoder_columns(decode_error),
            ))

    def _decode(self, batch: list[_Parsed]) -> tuple[list[torch.Tensor], list[str | None]]:
        """The images (3, h, w) of one batch, and per image why the decoder asked for was not applied (or None)."""
        codec, headers, symbols = batch[0].codec, [p.header for p in batch], [p.symbols for p in batch]
        images = codec.synthesise(headers, symbols)
        if self.corrdiff is not None:
            return self._corrdiff_decode(batch, images)
        if self.refiner is not None:
            try:
                images = self.refiner.refine(decoded_batch(codec, headers, symbols, images), self.config.refine_steps,
                                             self.guidance, codec=codec)
            except RefinerMismatchError as err:  # keep the codec's own reconstruction, and say so
                return list(images), [f"not refined: {err}"] * len(batch)
        return list(images), [None] * len(batch)

    def _corrdiff_decode(self, batch: list[_Parsed], x_hat: list[torch.Tensor]) -> tuple[list, list[str | None]]:
        """CorrDiff for the images whose coefficients this decoder can use; the codec's x̂, and why, for the rest."""
        refusals = [self._corrdiff_refusal(item) for item in batch]
        usable = [i for i, refusal in enumerate(refusals) if refusal is None]
        images = list(x_hat)
        if usable:
            outputs = corrdiff_decode(
                self.corrdiff, batch[0].codec, [batch[i].header for i in usable], [batch[i].symbols for i in usable],
                [batch[i].corrections for i in usable], self.config.perception, x_hat=[x_hat[i] for i in usable],
            )
            for i, output in zip(usable, outputs):
                images[i] = output
        return images, [refusal and f"not corrdiff-decoded: {refusal}" for refusal in refusals]

    def _corrdiff_refusal(self, item: _Parsed) -> str | None:
        """Why this bitstream cannot be decoded by the loaded CorrDiff decoder, or None."""
        if item.corrections is None:
            return ("the bitstream carries no CorrDiff coefficients (compressed without --corrdiff); "
                    "restored with the codec's decoder")
        sha = self.corrdiff.identity()
        if item.corrections.decoder_sha256 != sha:
            return (f"its coefficients are for CorrDiff decoder {item.corrections.decoder_sha256}, not the loaded "
                    f"{sha}: pass that decoder with --corrdiff; restored with the codec's decoder")
        try:
            self.corrdiff.check_codec(item.header.model_sha256)
        except CorrDiffMismatchError as err:
            return f"{err}; restored with the codec's decoder"
        return None

    def decoder_columns(self, decode_error: str | None) -> dict:
        """The restore manifest's record of the diffusion decoder that made the image (none on a refusal)."""
        if decode_error:
            return {}
        if self.corrdiff is not None:
            return {"corrdiff_sha256": self.corrdiff.identity(), "perception": self.config.perception}
        if self.refiner is not None:
            return {"refiner_sha256": self.refiner.sha256, "refine_steps": self.config.refine_steps,
                    "guidance": self.guidance.strength if self.guidance else None}
        return {}

    def _write_through(self, task: RestoreTask, item: _Parsed, sink, rows: list[RestoreRow]) -> None:
        written, refused = sink.write_sample(item.sample, None)
        stored = "no bitstream member (the sample was stored unchanged at compression)"
        error = "; ".join([*item.problems, item.error or stored])
        rows.append(RestoreRow(
            task.job_id, redact(task.input_url), item.index, printable_name(item.sample.key),
            member=printable_name(item.member.name) if item.member else None, output=written,
            status=STATUS_ERROR, error=redact("; ".join(filter(None, [error, _refused_message(refused)]))),
        ))


def _refused_message(refused: list[str]) -> str | None:
    if not refused:
        return None
    return f"not written: {', '.join(refused)}"


class _TarSink:
    """Writes restored samples into one tar, committed atomically."""

    def __init__(self, url: str):
        self.url = url
        self._stack = ExitStack()

    def __enter__(self) -> "_TarSink":
        handle = self._stack.enter_context(atomic_writer(self.url))
        self.writer = self._stack.enter_context(TarShardWriter(handle))
        return self

    def __exit__(self, *exc) -> bool | None:
        return self._stack.__exit__(*exc)

    def write_sample(self, sample: Sample, replace: _Replacement | None) -> tuple[str, list[str]]:
        for name, data in _members_out(sample, replace):
            self.writer.add(name, data)
        return redact(self.url), []


class _DirectorySink:
    """Writes restored samples as files under a directory; refuses names that would escape it,
    and names an earlier sample of the shard already wrote (a duplicate key must not overwrite)."""

    def __init__(self, url: str):
        self.url = url
        self.written: set[str] = set()

    def __enter__(self) -> "_DirectorySink":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def write_sample(self, sample: Sample, replace: _Replacement | None) -> tuple[str, list[str]]:
        """Returns where the sample went (printable) and the names refused, each with why."""
        written, refused = [], []
        for name, data in _members_out(sample, replace):
            relative = safe_relative_path(name)
            if relative is None:
                refused.append(f"{printable_name(name)} (name would escape the output directory)")
                continue
            if relative in self.written:
                refused.append(f"{printable_name(name)} (already written by an earlier sample: duplicate key)")
                continue
            write_bytes_atomic(join_url(self.url, relative), data)
            self.written.add(relative)
            written.append(relative)
        return redact(printable_name(join_url(self.url, written[0]) if written else self.url)), refused


@dataclass(frozen=True)
class _Replacement:
    """The member a restore replaces (the bitstream), and what it writes instead."""

    member: TarMember
    name: str
    data: bytes


def _members_out(sample: Sample, replace: _Replacement | None):
    for member in sample.members:
        if replace is not None and member is replace.member:
            yield replace.name, replace.data
        else:
            yield member.name, member.data


def safe_relative_path(name: str) -> str | None:
    """A member name as a path inside the output directory; None if it would escape it."""
    normal = posixpath.normpath(name)
    if not name or name.startswith("/") or normal == ".." or normal.startswith("../") or "\\" in name or "\x00" in name:
        return None
    return normal
