"""The ncpipe bitstream container: the one place its layout is defined.

The written specification is ``docs/bitstream.md``; keep the two in step. Every field
is validated on parse and every failure raises :class:`BitstreamError`: a damaged or
hostile bitstream never crashes the decoder, never makes it loop, and never makes it
allocate more than its declared (and limited) image size implies.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass

from ncpipe.errors import NcpipeError
from ncpipe.images import (
    DEFAULT_MAX_PIXELS,  # noqa: F401  (re-exported for decoders)
    MAX_METADATA_BYTES,
    ImageMetadata,
)

MAGIC = b"NCPB"
# Version 1: a fixed-rate model's bitstream; 2: the same plus extensions; 3: a variable-rate
# model's bitstream, whose header also names the quality level (extensions optional); 4: the
# version-3 layout (quality 0 for a fixed-rate model) carrying the image's EXIF / ICC / XMP.
FORMAT_VERSION = 4
SUPPORTED_VERSIONS = frozenset({1, 2, 3, 4})

# Architecture codes are part of the format: never renumber, only append.
ARCHITECTURE_CODES = {1: "mbt2018-mean", 2: "bmshj2018-hyperprior"}
ARCHITECTURE_IDS = {name: code for code, name in ARCHITECTURE_CODES.items()}
# Source image modes (see ncpipe.images); also never renumbered.
SOURCE_MODE_CODES = {0: "RGB", 1: "L", 2: "P", 3: "RGBA", 4: "LA", 5: "PA"}
SOURCE_MODE_IDS = {name: code for code, name in SOURCE_MODE_CODES.items()}

LATENT_STRIDE = 16
HYPER_STRIDE = 64

# magic, version, arch, sha256, rate, width, height, mode, pad_r, pad_b,
# y (C, H, W), z (C, H, W), y channels per chunk
_HEADER = struct.Struct("<4sBB32sfHHBBBHHHHHHH")
_QUALITY = struct.Struct("<B")  # versions 3, 4: the quality level, between the fixed header and its CRC
_CRC = struct.Struct("<I")
_CHUNK_LENGTH = struct.Struct("<I")
HEADER_SIZE = _HEADER.size + _CRC.size  # versions 1 and 2
MAX_QUALITY = 255
CHUNK_OVERHEAD = _CHUNK_LENGTH.size + _CRC.size

# Version 2: extensions after the y chunks (decoder side information).
EXTENSION_CORRDIFF = 1  # CorrDiff correction coefficients (see CorrectionCoefficients)
# Version 4: what the image carried besides pixels, byte for byte (restored into its PNG).
EXTENSION_EXIF = 2
EXTENSION_ICC = 3
EXTENSION_XMP = 4
METADATA_KINDS = frozenset({EXTENSION_EXIF, EXTENSION_ICC, EXTENSION_XMP})
EXTENSION_KINDS = {EXTENSION_CORRDIFF: "corrdiff", EXTENSION_EXIF: "EXIF", EXTENSION_ICC: "ICC profile",
                   EXTENSION_XMP: "XMP"}
MAX_EXTENSIONS = 8
MAX_EXTENSION_BYTES = 4096  # CorrDiff coefficients
METADATA_VERSION = 4  # the first version that may carry METADATA_KINDS
_EXTENSION_HEADER = struct.Struct("<BI")  # kind, payload length
# CorrDiff payload: decoder SHA-256, noise seed, steps, bits per coefficient, then packed indices.
_CORRDIFF_HEADER = struct.Struct("<32sIBB")
CORRECTION_RANGE = (0.0, 1.0)  # λ_t is quantized uniformly over this range
MAX_CORRECTION_STEPS = 64


class BitstreamError(NcpipeError, ValueError):
    """The bytes are not a valid ncpipe bitstream; the message says which field failed."""


@dataclass(frozen=True)
class BitstreamHeader:
    """Everything a decoder must know before it touches the entropy-coded payload."""

    architecture: str
    model_sha256: str  # hex digest of the model (see ncpipe.models.checkpoint)
    rate: float  # the model's rate parameter (λ of its training loss)
    width: int
    height: int
    source_mode: str
    pad_right: int
    pad_bottom: int
    y_shape: tuple[int, int, int]  # (channels, height, width) of the latent
    z_shape: tuple[int, int, int]  # (channels, height, width) of the hyper-latent
    y_chunk_channels: int  # latent channels per y chunk (the last chunk may hold fewer)
    quality: int = 0  # quality level of a variable-rate model (1..255); 0: a fixed-rate model
    version: int = 1  # as read; pack() writes the lowest version that holds the bitstream (see pack)

    @property
    def size(self) -> int:
        """Bytes of the header, CRC included."""
        return HEADER_SIZE + (_QUALITY.size if self.version >= 3 else 0)

    @property
    def num_y_chunks(self) -> int:
        return math.ceil(self.y_shape[0] / self.y_chunk_channels)

    def y_chunk_ranges(self) -> list[tuple[int, int]]:
        """[start, stop) latent channels of each y chunk."""
        step, total = self.y_chunk_channels, self.y_shape[0]
        return [(start, min(start + step, total)) for start in range(0, total, step)]


@dataclass(frozen=True)
class Extension:
    """Decoder side information carried by a version-2 bitstream."""

    kind: int
    payload: bytes


@dataclass(frozen=True)
class Bitstream:
    header: BitstreamHeader
    z_stream: bytes
    y_streams: tuple[bytes, ...]
    extensions: tuple[Extension, ...] = ()

    def extension(self, kind: int) -> Extension | None:
        return next((e for e in self.extensions if e.kind == kind), None)

    @property
    def metadata(self) -> ImageMetadata:
        """The EXIF / ICC / XMP the source image carried (version 4), empty otherwise."""
        def payload(kind: int) -> bytes | None:
            found = self.extension(kind)
            return found.payload if found else None

        return ImageMetadata(payload(EXTENSION_EXIF), payload(EXTENSION_ICC), payload(EXTENSION_XMP))


def metadata_extensions(metadata: ImageMetadata) -> tuple[Extension, ...]:
    """The version-4 extensions that carry ``metadata`` (none for an image without any)."""
    blocks = ((EXTENSION_EXIF, metadata.exif), (EXTENSION_ICC, metadata.icc_profile), (EXTENSION_XMP, metadata.xmp))
    return tuple(Extension(kind, block) for kind, block in blocks if block)


def image_metadata(data: bytes | memoryview) -> ImageMetadata:
    """The metadata a bitstream carries; reads the extensions only of a version-4 bitstream."""
    if len(data) > 4 and data[4] >= METADATA_VERSION:
        return parse(data, max_pixels=None).metadata
    return ImageMetadata()


@dataclass(frozen=True)
class CorrectionCoefficients:
    """CorrDiff's per-step correction strengths λ_t, quantized to ``bits`` each.

    ``indexes[t]`` encodes λ_t = lo + indexes[t] · (hi − lo) / (2^bits − 1) over
    :data:`CORRECTION_RANGE`; ``seed`` seeds the sampler's starting noise, and
    ``decoder_sha256`` names the diffusion decoder the coefficients were computed for."""

    decoder_sha256: str
    seed: int
    bits: int
    indexes: tuple[int, ...]

    @property
    def values(self) -> tuple[float, ...]:
        lo, hi = CORRECTION_RANGE
        levels = (1 << self.bits) - 1
        return tuple(lo + (hi - lo) * i / levels for i in self.indexes)

    @classmethod
    def quantize(cls, decoder_sha256: str, seed: int, bits: int, values) -> "CorrectionCoefficients":
        lo, hi = CORRECTION_RANGE
        levels = (1 << bits) - 1
        indexes = tuple(int(round((min(max(v, lo), hi) - lo) / (hi - lo) * levels)) for v in values)
        return cls(decoder_sha256, seed, bits, indexes)

    def to_extension(self) -> Extension:
        if not (1 <= self.bits <= 8 and 1 <= len(self.indexes) <= MAX_CORRECTION_STEPS):
            raise BitstreamError(f"{len(self.indexes)} coefficients of {self.bits} bits cannot be written")
        packed = 0
        for i, index in enumerate(self.indexes):
            packed |= index << (i * self.bits)
        body = packed.to_bytes((len(self.indexes) * self.bits + 7) // 8, "little")
        head = _CORRDIFF_HEADER.pack(bytes.fromhex(self.decoder_sha256), self.seed, len(self.indexes), self.bits)
        return Extension(EXTENSION_CORRDIFF, head + body)

    @classmethod
    def from_extension(cls, extension: Extension) -> "CorrectionCoefficients":
        payload = extension.payload
        if len(payload) < _CORRDIFF_HEADER.size:
            raise BitstreamError("CorrDiff extension shorter than its header")
        sha, seed, steps, bits = _CORRDIFF_HEADER.unpack(payload[: _CORRDIFF_HEADER.size])
        if not (1 <= bits <= 8 and 1 <= steps <= MAX_CORRECTION_STEPS):
            raise BitstreamError(f"CorrDiff extension declares {steps} steps of {bits} bits")
        body = payload[_CORRDIFF_HEADER.size :]
        if len(body) != (steps * bits + 7) // 8:
            raise BitstreamError(f"CorrDiff extension holds {len(body)} coefficient bytes for {steps}x{bits} bits")
        packed = int.from_bytes(body, "little")
        mask = (1 << bits) - 1
        return cls(sha.hex(), seed, bits, tuple((packed >> (i * bits)) & mask for i in range(steps)))


def expected_header(
    *,
    architecture: str,
    model_sha256: str,
    rate: float,
    width: int,
    height: int,
    source_mode: str,
    y_channels: int,
    z_channels: int,
    y_chunk_channels: int,
    quality: int = 0,
) -> BitstreamHeader:
    """The header an encoder writes for an image of this size: padding and latent shapes derived."""
    padded_w = math.ceil(width / HYPER_STRIDE) * HYPER_STRIDE
    padded_h = math.ceil(height / HYPER_STRIDE) * HYPER_STRIDE
    return BitstreamHeader(
        architecture=architecture,
        model_sha256=model_sha256,
        rate=rate,
        width=width,
        height=height,
        source_mode=source_mode,
        pad_right=padded_w - width,
        pad_bottom=padded_h - height,
        y_shape=(y_channels, padded_h // LATENT_STRIDE, padded_w // LATENT_STRIDE),
        z_shape=(z_channels, padded_h // HYPER_STRIDE, padded_w // HYPER_STRIDE),
        y_chunk_channels=min(y_chunk_channels, y_channels),
        quality=quality,
    )


def pack(bitstream: Bitstream) -> bytes:
    """Serialise; validates the header so a writer can never emit what a reader refuses."""
    header = bitstream.header
    _validate_header(header, max_pixels=None)
    if len(bitstream.y_streams) != header.num_y_chunks:
        raise BitstreamError(f"{len(bitstream.y_streams)} y chunks given, header implies {header.num_y_chunks}")
    version = _version_for(header, bitstream.extensions)
    fixed = _HEADER.pack(
        MAGIC,
        version,
        ARCHITECTURE_IDS[header.architecture],
        bytes.fromhex(header.model_sha256),
        header.rate,
        header.width,
        header.height,
        SOURCE_MODE_IDS[header.source_mode],
        header.pad_right,
        header.pad_bottom,
        *header.y_shape,
        *header.z_shape,
        header.y_chunk_channels,
    ) + (_QUALITY.pack(header.quality) if version >= 3 else b"")
    parts = [fixed, _CRC.pack(zlib.crc32(fixed))]
    for stream in (bitstream.z_stream, *bitstream.y_streams):
        parts += [_CHUNK_LENGTH.pack(len(stream)), stream, _CRC.pack(zlib.crc32(stream))]
    if version >= 2:  # version 3 always has the extension count, which may be 0
        if len(bitstream.extensions) > MAX_EXTENSIONS:
            raise BitstreamError(f"at most {MAX_EXTENSIONS} extensions")
        parts.append(bytes([len(bitstream.extensions)]))
        for extension in bitstream.extensions:
            if extension.kind not in EXTENSION_KINDS or len(extension.payload) > _extension_limit(extension.kind):
                raise BitstreamError(
                    f"extension kind {extension.kind} ({len(extension.payload)} bytes) cannot be written")
            _checked_payload(extension)  # a writer never emits what a reader refuses
            head = _EXTENSION_HEADER.pack(extension.kind, len(extension.payload))
            parts += [head, extension.payload, _CRC.pack(zlib.crc32(head + extension.payload))]
    return b"".join(parts)


def _version_for(header: BitstreamHeader, extensions: tuple[Extension, ...]) -> int:
    """The lowest version that holds this header and these extensions."""
    if any(e.kind in METADATA_KINDS for e in extensions):
        return METADATA_VERSION
    return 3 if header.quality else 2 if extensions else 1


def _extension_limit(kind: int) -> int:
    return MAX_METADATA_BYTES if kind in METADATA_KINDS else MAX_EXTENSION_BYTES


def parse_header(data: bytes | memoryview, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> BitstreamHeader:
    """Validate and return the header alone (cheap: no payload is read)."""
    data = memoryview(data)
    if len(data) < HEADER_SIZE:
        raise BitstreamError(f"{len(data)} bytes is shorter than the {HEADER_SIZE}-byte header")
    if bytes(data[:4]) != MAGIC:
        raise BitstreamError(f"bad magic {bytes(data[:4])!r}: not an ncpipe bitstream")
    version = data[4]
    if version not in SUPPORTED_VERSIONS:
        raise BitstreamError(
            f"format version {version} is not supported (this ncpipe reads {sorted(SUPPORTED_VERSIONS)})")
    fixed_size = _HEADER.size + (_QUALITY.size if version >= 3 else 0)
    if len(data) < fixed_size + _CRC.size:
        raise BitstreamError(f"{len(data)} bytes is shorter than the {fixed_size + _CRC.size}-byte header")
    fixed = data[:fixed_size]
    (crc,) = _CRC.unpack(data[fixed_size : fixed_size + _CRC.size])
    if zlib.crc32(fixed) != crc:
        raise BitstreamError("header CRC32 mismatch: the header is damaged")
    fields = _HEADER.unpack(fixed[: _HEADER.size])
    quality = _QUALITY.unpack(fixed[_HEADER.size :])[0] if version >= 3 else 0
    if version == 3 and quality == 0:
        raise BitstreamError("a version-3 bitstream must name a quality level (1..255), not 0")
    arch_code = fields[2]
    if arch_code not in ARCHITECTURE_CODES:
        raise BitstreamError(f"unknown architecture code {arch_code}")
    if fields[7] not in SOURCE_MODE_CODES:
        raise BitstreamError(f"unknown source mode code {fields[7]}")
    header = BitstreamHeader(
        architecture=ARCHITECTURE_CODES[arch_code],
        model_sha256=fields[3].hex(),
        rate=fields[4],
        width=fields[5],
        height=fields[6],
        source_mode=SOURCE_MODE_CODES[fields[7]],
        pad_right=fields[8],
        pad_bottom=fields[9],
        y_shape=tuple(fields[10:13]),
        z_shape=tuple(fields[13:16]),
        y_chunk_channels=fields[16],
        quality=quality,
        version=version,
    )
    _validate_header(header, max_pixels)
    return header


EXTENSIONS_PART = "extensions"  # how walk() names damage in the extension block
TRAILER_PART = "trailer"  # ... and bytes after the last chunk or extension


@dataclass(frozen=True)
class Damage:
    """One damaged part of a bitstream, as :func:`walk` finds it."""

    part: str  # a chunk's name ("chunk 2 (latent y channels 8-15)"), EXTENSIONS_PART or TRAILER_PART
    message: str  # what parse() raises when this is the first damage


@dataclass(frozen=True)
class Walk:
    """A bitstream read part by part: every chunk that could be framed, its payload None when its
    CRC32 fails; the extensions when they are intact; every damaged part."""

    header: BitstreamHeader
    chunks: tuple[tuple[str, bytes | None], ...]  # (name, payload): z, then the y chunks
    extensions: tuple[Extension, ...]
    damage: tuple[Damage, ...]


def walk(data: bytes | memoryview, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Walk:
    """Read a bitstream as :func:`parse` does, but on past a chunk whose CRC32 fails, so that a checker
    can name every damaged part; a bad header still raises :class:`BitstreamError`."""
    data = memoryview(data)
    header = parse_header(data, max_pixels)
    offset = header.size
    chunks: list[tuple[str, bytes | None]] = []
    damage: list[Damage] = []
    for index in range(1 + header.num_y_chunks):
        name = _chunk_name(header, index)
        try:
            payload, offset = _read_chunk(data, offset, name)
        except BitstreamError as err:  # truncated: nothing after it can be framed
            return Walk(header, tuple(chunks), (), (*damage, Damage(name, str(err))))
        if payload is None:
            damage.append(Damage(name, f"CRC32 mismatch in {name}: the payload is damaged"))
        chunks.append((name, payload))
    extensions: tuple[Extension, ...] = ()
    if header.version >= 2:
        try:
            extensions, offset = _read_extensions(data, offset, header.version)
        except BitstreamError as err:
            return Walk(header, tuple(chunks), (), (*damage, Damage(EXTENSIONS_PART, str(err))))
    if offset != len(data):
        damage.append(Damage(TRAILER_PART, f"{len(data) - offset} unexpected bytes after the last chunk"))
    return Walk(header, tuple(chunks), extensions, tuple(damage))


def parse(data: bytes | memoryview, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Bitstream:
    """Validate every field and CRC; raise :class:`BitstreamError` naming the first failure."""
    walked = walk(data, max_pixels)
    if walked.damage:
        raise BitstreamError(walked.damage[0].message)
    streams = tuple(payload for _, payload in walked.chunks)
    return Bitstream(walked.header, streams[0], streams[1:], walked.extensions)


def _read_extensions(data: memoryview, offset: int, version: int) -> tuple[tuple[Extension, ...], int]:
    if offset >= len(data):
        raise BitstreamError("truncated: the version-2 extension count is missing")
    count = data[offset]
    offset += 1
    least = 0 if version == 3 else 1  # versions 2 and 4 exist only to carry extensions
    if not least <= count <= MAX_EXTENSIONS:
        raise BitstreamError(f"extension count {count} is outside {least}..{MAX_EXTENSIONS}")
    extensions = []
    for index in range(count):
        end = offset + _EXTENSION_HEADER.size
        if end > len(data):
            raise BitstreamError(f"truncated: extension {index} is missing")
        kind, length = _EXTENSION_HEADER.unpack(data[offset:end])
        if kind not in EXTENSION_KINDS:
            raise BitstreamError(f"extension kind {kind} is not supported by this reader")
        if kind in METADATA_KINDS and version < METADATA_VERSION:
            raise BitstreamError(f"extension kind {kind} ({EXTENSION_KINDS[kind]}) needs format version 4")
        if length > _extension_limit(kind) or end + length + _CRC.size > len(data):
            raise BitstreamError(f"truncated or oversized: extension {index} declares {length} bytes")
        payload = bytes(data[end : end + length])
        (crc,) = _CRC.unpack(data[end + length : end + length + _CRC.size])
        if zlib.crc32(bytes(data[offset:end]) + payload) != crc:
            raise BitstreamError(f"CRC32 mismatch in extension {index} ({EXTENSION_KINDS[kind]})")
        extensions.append(_checked_payload(Extension(kind, payload)))
        offset = end + length + _CRC.size
    if len({e.kind for e in extensions}) != len(extensions):
        raise BitstreamError("an extension kind appears twice")
    return tuple(extensions), offset


def _checked_payload(extension: Extension) -> Extension:
    """A known kind's payload must read as its decoder reads it: a CorrDiff extension whose
    coefficients cannot be unpacked is refused here, not first by ``--decoder corrdiff``."""
    if extension.kind == EXTENSION_CORRDIFF:
        CorrectionCoefficients.from_extension(extension)
    return extension


def _chunk_name(header: BitstreamHeader, index: int) -> str:
    if index == 0:
        return "chunk 0 (hyper-latent z)"
    start, stop = header.y_chunk_ranges()[index - 1]
    return f"chunk {index} (latent y channels {start}-{stop - 1})"


def _read_chunk(data: memoryview, offset: int, name: str) -> tuple[bytes | None, int]:
    """A chunk's payload (None when its CRC32 fails) and the offset after it; raises when truncated."""
    if offset + _CHUNK_LENGTH.size > len(data):
        raise BitstreamError(f"truncated: {name} is missing")
    (length,) = _CHUNK_LENGTH.unpack(data[offset : offset + _CHUNK_LENGTH.size])
    start = offset + _CHUNK_LENGTH.size
    end = start + length
    if end + _CRC.size > len(data):
        raise BitstreamError(f"truncated: {name} declares {length} bytes, {max(len(data) - start, 0)} remain")
    payload = bytes(data[start:end])
    (crc,) = _CRC.unpack(data[end : end + _CRC.size])
    return (payload if zlib.crc32(payload) == crc else None), end + _CRC.size


def _validate_header(header: BitstreamHeader, max_pixels: int | None) -> None:
    if header.architecture not in ARCHITECTURE_IDS:
        raise BitstreamError(f"architecture {header.architecture!r} has no code in this format version")
    if header.source_mode not in SOURCE_MODE_IDS:
        raise BitstreamError(f"source mode {header.source_mode!r} has no code")
    if len(header.model_sha256) != 64:
        raise BitstreamError("model SHA-256 must be 64 hex digits")
    if not (math.isfinite(header.rate) and header.rate > 0):
        raise BitstreamError(f"rate parameter {header.rate} is not a positive finite number")
    if not 0 <= header.quality <= MAX_QUALITY:
        raise BitstreamError(f"quality {header.quality} is outside 0..{MAX_QUALITY}")
    if not (1 <= header.width <= 0xFFFF and 1 <= header.height <= 0xFFFF):
        raise BitstreamError(f"image size {header.width}x{header.height} is outside 1..65535")
    if max_pixels is not None and header.width * header.height > max_pixels:
        raise BitstreamError(
            f"declared size {header.width}x{header.height} exceeds the decoder limit of {max_pixels} pixels"
        )
    derived = expected_header(
        architecture=header.architecture,
        model_sha256=header.model_sha256,
        rate=header.rate,
        width=header.width,
        height=header.height,
        source_mode=header.source_mode,
        y_channels=header.y_shape[0],
        z_channels=header.z_shape[0],
        y_chunk_channels=header.y_chunk_channels,
    )
    if (header.pad_right, header.pad_bottom) != (derived.pad_right, derived.pad_bottom):
        raise BitstreamError(
            f"padding {header.pad_right}x{header.pad_bottom} does not match size "
            f"{header.width}x{header.height} (expected {derived.pad_right}x{derived.pad_bottom})"
        )
    if header.y_shape != derived.y_shape or header.z_shape != derived.z_shape:
        raise BitstreamError(f"latent shapes {header.y_shape}, {header.z_shape} do not match the image size")
    if min(header.y_shape[0], header.z_shape[0]) < 1:
        raise BitstreamError("latent channel counts must be positive")
    if not 1 <= header.y_chunk_channels <= header.y_shape[0]:
        raise BitstreamError(f"y chunk size {header.y_chunk_channels} is outside 1..{header.y_shape[0]}")
