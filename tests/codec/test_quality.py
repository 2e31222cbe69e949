"""The quality knob of a variable-rate model: one model, every rate, decoded without flags, exactly."""

import numpy as np
import pytest
import torch

from ncpipe import bitstream as fmt
from ncpipe.models.checkpoint import QualityError
from tests.conftest import TINY_VBR_LAMBDAS
from tests.factories import kodak_pixels

QUALITIES = range(1, len(TINY_VBR_LAMBDAS) + 1)


def _images():
    return [kodak_pixels(5, (128, 192)), kodak_pixels(9, (100, 130)), kodak_pixels(13, (65, 129))]


def test_every_quality_decodes_without_flags_to_the_encoders_latents(vbr):
    images = _images()
    for quality in QUALITIES:
        batch = vbr.analyse(images, quality=quality)
        for i, data in enumerate(vbr.encode_batch(images, ["RGB"] * len(images), quality=quality)):
            header, symbols = vbr.decode_symbols(data)
            assert header.quality == quality and header.rate == pytest.approx(TINY_VBR_LAMBDAS[quality - 1])
            np.testing.assert_array_equal(symbols.y, batch.y_symbols[i])
            np.testing.assert_array_equal(symbols.z, batch.z_symbols[i])


def test_bits_grow_and_distortion_falls_with_quality(vbr):
    image = kodak_pixels(5, (192, 256))
    sizes, errors = [], []
    for quality in QUALITIES:
        (data,) = vbr.encode_batch([image], ["RGB"], quality=quality)
        sizes.append(len(data))
        _, decoded = vbr.decode(data)
        errors.append(np.mean((decoded.astype(float) - image) ** 2))
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    assert errors[-1] < errors[0]


def test_entropy_parameters_are_exact_across_batches_threads_and_qualities(vbr):
    z = torch.from_numpy(vbr.analyse(_images()).z_symbols)
    previous = torch.get_num_threads()
    try:
        for quality in QUALITIES:
            reference = vbr.entropy_parameters(z, [quality] * len(z))
            for threads in (1, 2):
                torch.set_num_threads(threads)
                for i in range(len(z)):
                    indexes, means = vbr.entropy_parameters(z[i : i + 1], [quality])
                    assert torch.equal(indexes[0], reference[0][i]) and torch.equal(means[0], reference[1][i])
        mixed = vbr.entropy_parameters(z, [1, 3, 2])[0]
        for i, quality in enumerate((1, 3, 2)):
            assert torch.equal(mixed[i], vbr.entropy_parameters(z[i : i + 1], [quality])[0][0])
    finally:
        torch.set_num_threads(previous)


def test_a_lower_quality_uses_wider_distributions(vbr):
    z = torch.from_numpy(vbr.analyse(_images()[:1]).z_symbols)
    low, high = (vbr.entropy_parameters(z, [q])[0].double().mean() for q in (1, 3))
    assert low < high  # larger steps Δ: smaller σ/Δ, smaller table indexes


def test_qualities_a_model_does_not_have_are_refused(vbr, tiny_codec):
    image = kodak_pixels(5, (64, 64))
    for quality in (0, len(TINY_VBR_LAMBDAS) + 1):
        with pytest.raises(QualityError, match="quality"):
            vbr.encode_batch([image], ["RGB"], quality=quality)
    with pytest.raises(QualityError, match="fixed-rate"):
        tiny_codec.encode_batch([image], ["RGB"], quality=2)
    assert tiny_codec.default_quality == 0 and vbr.default_quality == 2


def test_a_header_whose_rate_is_not_the_models_is_refused(vbr):
    (data,) = vbr.encode_batch([kodak_pixels(5, (64, 64))], ["RGB"], quality=2)
    parsed = fmt.parse(data)
    forged = fmt.pack(fmt.Bitstream(
        fmt.expected_header(architecture=parsed.header.architecture, model_sha256=parsed.header.model_sha256,
                            rate=0.5, width=64, height=64, source_mode="RGB", y_channels=24, z_channels=16,
                            y_chunk_channels=8, quality=2),
        parsed.z_stream, parsed.y_streams))
    with pytest.raises(fmt.BitstreamError, match="rate parameter"):
        vbr.decode_symbols(forged)
