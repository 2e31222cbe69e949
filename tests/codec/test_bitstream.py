"""The container format: every field validated, every failure a BitstreamError."""

import dataclasses
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ncpipe import bitstream as fmt


def _header(**changes) -> fmt.BitstreamHeader:
    header = fmt.expected_header(
        architecture="mbt2018-mean", model_sha256="ab" * 32, rate=0.0067, width=130, height=65,
        source_mode="RGB", y_channels=24, z_channels=16, y_chunk_channels=8,
    )
    return dataclasses.replace(header, **changes)


def _packed(header=None) -> bytes:
    header = header or _header()
    y = tuple(bytes([i]) * (i + 3) for i in range(header.num_y_chunks))
    return fmt.pack(fmt.Bitstream(header, b"zz-stream", y))


def test_round_trip():
    header = _header()
    parsed = fmt.parse(_packed(header))
    assert dataclasses.replace(parsed.header, rate=header.rate) == header
    assert parsed.z_stream == b"zz-stream" and len(parsed.y_streams) == 3
    assert (header.pad_right, header.pad_bottom, header.y_shape, header.z_shape) == (62, 63, (24, 8, 12), (16, 2, 3))


def _with_header_field(data: bytes, index: int, value) -> bytes:
    """Rewrite one header field and fix the header CRC, to reach the field's own check."""
    fields = list(fmt._HEADER.unpack(data[: fmt._HEADER.size]))
    fields[index] = value
    fixed = fmt._HEADER.pack(*fields)
    return fixed + struct.pack("<I", zlib.crc32(fixed)) + data[fmt.HEADER_SIZE :]


@pytest.mark.parametrize(
    "index, value, message",
    [
        (0, b"NCPX", "bad magic"),
        (1, 99, "format version 99"),
        (2, 77, "architecture code"),
        (4, float("nan"), "rate"),
        (4, -1.0, "rate"),
        (5, 0, "outside 1..65535"),
        (7, 9, "source mode"),
        (8, 3, "padding"),
        (12, 13, "latent shapes"),
        (14, 1, "latent shapes"),
        (11, 9, "latent shapes"),
        (16, 0, "chunk size"),
        (16, 30, "chunk size"),
    ],
)
def test_each_header_field_is_validated(index, value, message):
    with pytest.raises(fmt.BitstreamError, match=message):
        fmt.parse(_with_header_field(_packed(), index, value))


def test_declared_size_beyond_the_decoder_limit_is_refused_before_any_payload():
    header = fmt.expected_header(
        architecture="mbt2018-mean", model_sha256="00" * 32, rate=1.0, width=65535, height=65535,
        source_mode="RGB", y_channels=4, z_channels=4, y_chunk_channels=4,
    )
    data = _packed(header)
    with pytest.raises(fmt.BitstreamError, match="exceeds the decoder limit"):
        fmt.parse(data)
    assert fmt.parse(data, max_pixels=None).header.width == 65535  # an explicit opt-out


def test_header_crc_and_chunk_crc_and_trailing_bytes():
    data = bytearray(_packed())
    damaged = bytes(data[:10]) + bytes([data[10] ^ 1]) + bytes(data[11:])
    with pytest.raises(fmt.BitstreamError, match="header CRC32"):
        fmt.parse(damaged)
    data[-6] ^= 0x40
    with pytest.raises(fmt.BitstreamError, match=r"CRC32 mismatch in chunk 3 \(latent y channels 16-23\)"):
        fmt.parse(bytes(data))
    with pytest.raises(fmt.BitstreamError, match="unexpected bytes"):
        fmt.parse(_packed() + b"\0")


def test_every_truncation_is_refused():
    data = _packed()
    for cut in range(len(data)):
        with pytest.raises(fmt.BitstreamError):
            fmt.parse(data[:cut])


def test_writer_refuses_what_the_reader_would():
    with pytest.raises(fmt.BitstreamError):
        fmt.pack(fmt.Bitstream(_header(width=0), b"", ()))
    with pytest.raises(fmt.BitstreamError, match="y chunks"):
        fmt.pack(fmt.Bitstream(_header(), b"", (b"",)))


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzzed_bitstreams_are_refused_or_parsed_never_crash(data):
    original = _packed()
    mutated = bytearray(original)
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(mutated) - 1))
        mutated[position] = data.draw(st.integers(0, 255))
    mutated = mutated[: data.draw(st.integers(0, len(mutated)))]
    try:
        parsed = fmt.parse(bytes(mutated))
    except fmt.BitstreamError:
        return
    assert parsed.header.width * parsed.header.height <= fmt.DEFAULT_MAX_PIXELS


def _corrections(steps=4, bits=6) -> fmt.CorrectionCoefficients:
    return fmt.CorrectionCoefficients.quantize("cd" * 32, 123456789, bits, [0.0, 0.31, 0.77, 1.0][:steps])


def test_version_2_carries_correction_coefficients_and_version_1_still_parses():
    v1 = _packed()
    assert v1[4] == 1 and fmt.parse(v1).extensions == ()
    header = _header()
    coefficients = _corrections()
    v2 = fmt.pack(fmt.Bitstream(header, b"zz-stream", tuple(b"y" for _ in range(3)), (coefficients.to_extension(),)))
    assert v2[4] == 2 and len(v2) == len(fmt.pack(fmt.Bitstream(header, b"zz-stream", (b"y",) * 3))) + 1 + 5 + 4 + 38 + 3
    parsed = fmt.parse(v2)
    assert parsed.header.version == 2
    restored = fmt.CorrectionCoefficients.from_extension(parsed.extension(fmt.EXTENSION_CORRDIFF))
    assert restored == coefficients
    assert restored.values[0] == 0.0 and restored.values[-1] == 1.0
    assert abs(restored.values[1] - 0.31) <= 0.5 / 63


@pytest.mark.parametrize("bits", [1, 3, 8])
def test_correction_quantization_round_trips(bits):
    c = fmt.CorrectionCoefficients.quantize("00" * 32, 7, bits, [i / 9 for i in range(10)])
    assert fmt.CorrectionCoefficients.from_extension(c.to_extension()) == c


def test_damaged_or_unknown_extensions_are_refused():
    ext = _corrections().to_extension()
    data = bytearray(fmt.pack(fmt.Bitstream(_header(), b"z", (b"y",) * 3, (ext,))))
    for cut in range(len(data) - 50, len(data)):
        with pytest.raises(fmt.BitstreamError):
            fmt.parse(bytes(data[:cut]))
    damaged = bytearray(data)
    damaged[-10] ^= 1
    with pytest.raises(fmt.BitstreamError, match="extension 0"):
        fmt.parse(bytes(damaged))
    with pytest.raises(fmt.BitstreamError, match="cannot be written"):
        fmt.pack(fmt.Bitstream(_header(), b"z", (b"y",) * 3, (fmt.Extension(99, b""),)))


# -- version 3: a variable-rate model's bitstream names its quality level ----------------------


def test_a_quality_makes_a_version_3_bitstream_that_round_trips():
    header = _header(quality=5)
    data = _packed(header)
    assert data[4] == 3
    parsed = fmt.parse(data)
    assert parsed.header.quality == 5 and parsed.header.version == 3 and parsed.extensions == ()
    assert dataclasses.replace(parsed.header, rate=header.rate, version=1) == header
    assert parsed.header.size == fmt.HEADER_SIZE + 1


def test_version_3_carries_extensions_too():
    extension = _corrections().to_extension()
    header = _header(quality=2)
    y = tuple(b"y" for _ in range(header.num_y_chunks))
    parsed = fmt.parse(fmt.pack(fmt.Bitstream(header, b"z", y, (extension,))))
    assert parsed.header.quality == 2 and parsed.extensions == (extension,)


def test_fixed_rate_bitstreams_keep_versions_1_and_2():
    assert _packed()[4] == 1 and fmt.parse(_packed()).header.quality == 0


def test_version_3_without_a_quality_is_refused():
    data = bytearray(_packed(_header(quality=1)))
    fixed_size = fmt.HEADER_SIZE - 4 + 1
    data[fixed_size - 1] = 0  # the quality byte, CRC fixed so the field's own check is reached
    data[fixed_size : fixed_size + 4] = struct.pack("<I", zlib.crc32(bytes(data[:fixed_size])))
    with pytest.raises(fmt.BitstreamError, match="must name a quality"):
        fmt.parse(bytes(data))
