"""Codec-level fuzzing: mutated and truncated bitstreams through the real decoder and a real model.

Random byte changes almost never get past the CRC32s (tests/codec/test_bitstream.py covers
that level); the structured fuzz here re-computes every CRC after mutating, so the damage
reaches the rANS decoder, the exact hyper-synthesis and the synthesis transform. Each
example must be refused with ``BitstreamError`` / ``ModelMismatchError`` or decode to an
image of the declared size, within a time bound, and the process's memory must stay flat.
"""

from __future__ import annotations

import resource
import signal
import struct
import zlib
from contextlib import contextmanager
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ncpipe import bitstream as fmt
from ncpipe.codec import LearnedCodec, ModelMismatchError
from ncpipe.models.checkpoint import load_codec_model
from tests.factories import kodak_pixels

FUZZ_MAX_PIXELS = 256 * 256  # a decoder's --max-pixels: bounds what one bitstream may make it allocate
SECONDS_PER_EXAMPLE = 10  # hard bound (SIGALRM); hypothesis's deadline is the tighter, reported one
REFUSALS = (fmt.BitstreamError, ModelMismatchError)


@pytest.fixture(scope="module")
def codec(tiny_model_path):
    codec = LearnedCodec(load_codec_model(tiny_model_path), y_chunk_channels=8, coder_threads=1)
    yield codec
    codec.close()


@pytest.fixture(scope="module")
def bitstreams(codec) -> list[bytes]:
    """Real bitstreams: a flat-ish image, a detailed one (escapes likely), odd sizes."""
    images = [kodak_pixels(1, (64, 64)), kodak_pixels(13, (70, 130)), kodak_pixels(20, (1, 1))]
    return [codec.encode_batch([image], ["RGB"])[0] for image in images]


@contextmanager
def _time_limit(seconds: int):
    def expire(signum, frame):
        raise TimeoutError(f"one example ran for more than {seconds}s (a hang)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _decode_or_refuse(codec: LearnedCodec, data: bytes) -> str:
    """The contract: refused with a clear error, or an image of the size the header declares."""
    with _time_limit(SECONDS_PER_EXAMPLE):
        try:
            header, symbols = codec.decode_symbols(data, FUZZ_MAX_PIXELS)
        except REFUSALS:
            return "refused"
        assert header.width * header.height <= FUZZ_MAX_PIXELS
        assert symbols.y.shape == header.y_shape and symbols.z.shape == header.z_shape
        (x_hat,) = codec.synthesise([header], [symbols])
        assert tuple(x_hat.shape) == (3, header.height, header.width)
        return "decoded"


def _frames(header_bytes: bytes, streams: list[bytes]) -> bytes:
    """A bitstream with valid CRCs around whatever header and payloads it is given."""
    parts = [header_bytes, struct.pack("<I", zlib.crc32(header_bytes))]
    for stream in streams:
        parts += [struct.pack("<I", len(stream)), stream, struct.pack("<I", zlib.crc32(stream))]
    return b"".join(parts)


@st.composite
def crc_valid_mutations(draw, originals: list[bytes]) -> bytes:
    """Mutate header fields or chunk payloads, then make every CRC right again."""
    data = draw(st.sampled_from(originals))
    header_bytes = bytearray(data[: fmt.HEADER_SIZE - 4])
    parsed = fmt.parse(data)
    streams = [bytearray(s) for s in (parsed.z_stream, *parsed.y_streams)]
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["payload byte", "payload byte", "word count", "truncate", "extend",
                                     "drop chunk", "header byte"]))
        target = streams[draw(st.integers(0, len(streams) - 1))] if streams else None
        if kind == "header byte":
            header_bytes[draw(st.integers(4, len(header_bytes) - 1))] = draw(st.integers(0, 255))
        elif target is None:
            continue
        elif kind == "payload byte" and target:
            target[draw(st.integers(0, len(target) - 1))] = draw(st.integers(0, 255))
        elif kind == "word count" and len(target) >= 4:
            target[:4] = struct.pack("<I", draw(st.sampled_from([0, 1, 2, 0xFFFF, 0xFFFFFFFF]))
                                     if draw(st.booleans()) else draw(st.integers(0, 2**32 - 1)))
        elif kind == "truncate":
            del target[draw(st.integers(0, len(target))):]
        elif kind == "extend":
            target += draw(st.binary(min_size=1, max_size=64))
        elif kind == "drop chunk":
            streams.pop(draw(st.integers(0, len(streams) - 1)))
    return _frames(bytes(header_bytes), [bytes(s) for s in streams])


def test_crc_valid_mutations_are_refused_or_decoded(codec, bitstreams):
    before = _peak_rss_mb()
    outcomes = {"refused": 0, "decoded": 0}

    @settings(max_examples=2000, deadline=timedelta(seconds=3), suppress_health_check=[HealthCheck.too_slow])
    @given(crc_valid_mutations(bitstreams))
    def fuzz(data):
        outcomes[_decode_or_refuse(codec, data)] += 1

    fuzz()
    assert outcomes["refused"] > 1000  # the mutations do reach the decoder's checks
    assert _peak_rss_mb() - before < 512, "decoding fuzzed bitstreams grew the process by more than 512 MB"


@settings(max_examples=1500, deadline=timedelta(seconds=3), suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_raw_mutations_and_truncations_through_decode(codec, bitstreams, data):
    original = bytearray(data.draw(st.sampled_from(bitstreams)))
    for _ in range(data.draw(st.integers(0, 4))):
        position = data.draw(st.integers(0, len(original) - 1))
        original[position] = data.draw(st.integers(0, 255))
    mutated = bytes(original[: data.draw(st.integers(0, len(original)))])
    with _time_limit(SECONDS_PER_EXAMPLE):
        try:
            header, pixels = codec.decode(mutated)
        except REFUSALS:
            return
    assert pixels.shape == (header.height, header.width, 3)

