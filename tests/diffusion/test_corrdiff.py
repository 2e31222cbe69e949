"""CorrDiff on a real tiny codec: the least-squares coefficient, the knob's endpoints, the v2 bitstream
round trip (decoder replay = encoder replay), determinism, codec and decoder binding, checkpoints."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from ncpipe import bitstream as fmt
from ncpipe.codec import LearnedCodec
from ncpipe.diffusion.corrdiff import (
    TRANSMITTED_PERCEPTION,
    CorrDiffConfig,
    CorrDiffDecoder,
    CorrDiffError,
    CorrDiffMismatchError,
    DecodedBatch,
    attach_corrections,
    compute_corrections,
    corrdiff_decode,
    corrected_estimate,
    corrections_for_images,
    decode_with_corrections,
    encoder_batch,
    knob_coefficient,
    load_corrdiff,
    optimal_coefficient,
    read_corrections,
    save_corrdiff,
    start_noise,
    transmitted_seed,
)
from ncpipe.diffusion.refiner import TrainedCodec, canvas_size, fit_canvas
from ncpipe.diffusion.samplers import sample_ddim
from ncpipe.diffusion.schedules import ddim_timesteps
from ncpipe.diffusion.unet import to_model_range
from ncpipe.models.checkpoint import CheckpointError
from tests.diffusion.conftest import SIZES, perturbed
from tests.diffusion.conftest import TINY as TINY_UNET
from tests.factories import kodak_pixels

KEYS = ("shard-0/sample-a", "shard-0/sample-b")



@pytest.fixture
def images() -> list[np.ndarray]:
    return [kodak_pixels(n, size) for n, size in zip((1, 2), SIZES)]


@pytest.fixture
def decoder(codec: LearnedCodec) -> CorrDiffDecoder:
    """An untrained decoder with nudged weights, so x0_diff is a real image-dependent estimate."""
    torch.manual_seed(0)
    identity = codec.model.identity
    config = CorrDiffConfig(latent_channels=24, unet=TINY_UNET, latent_features=2, conditioner_hidden=8, steps=3)
    decoder = CorrDiffDecoder(config, TrainedCodec(identity.sha256, identity.arch, identity.rate))
    return perturbed(decoder, scale=0.02).eval()


def originals(images: list[np.ndarray]) -> list[torch.Tensor]:
    return [torch.from_numpy(p).permute(2, 0, 1).float() / 255.0 for p in images]


def encoded(codec: LearnedCodec, images: list[np.ndarray]) -> DecodedBatch:
    return encoder_batch(codec, codec.analyse(images, reconstruct=True), KEYS)


def single(batch: DecodedBatch, i: int) -> DecodedBatch:
    return DecodedBatch(
        x_hat=batch.x_hat[i : i + 1], y_hat=batch.y_hat[i : i + 1], sizes=batch.sizes[i : i + 1], padded=batch.padded,
        rates=batch.rates[i : i + 1], codec_sha256=batch.codec_sha256[i : i + 1], keys=batch.keys[i : i + 1],
    )


# -- pure functions -----------------------------------------------------------------------------


def test_optimal_coefficient_is_the_least_squares_optimum() -> None:
    g = torch.Generator().manual_seed(0)
    x0, x_hat = torch.rand(3, 3, 8, 8, generator=g), torch.rand(3, 3, 8, 8, generator=g)
    noise = 0.02 * torch.randn(3, 3, 8, 8, generator=g)
    x = x0 + torch.tensor([0.3, 0.7, 0.05]).view(-1, 1, 1, 1) * (x_hat - x0) + noise
    lam = optimal_coefficient(x0, x_hat, x)
    for i in range(3):  # the normal equation of min_λ ‖(x0 + λ d) − x‖², solved by numpy's least squares
        d = (x_hat[i] - x0[i]).double().reshape(-1, 1).numpy()
        expected = np.linalg.lstsq(d, (x[i] - x0[i]).double().reshape(-1).numpy(), rcond=None)[0][0]
        assert float(lam[i]) == pytest.approx(expected, abs=1e-9)
        errors = [float(((corrected_estimate(x0[i : i + 1], x_hat[i : i + 1], float(lam[i]) + dv) - x[i]) ** 2).sum())
                  for dv in (0.0, 0.01, -0.01)]
        assert errors[0] <= min(errors[1:])


def test_optimal_coefficient_is_clamped_and_defined_without_a_direction() -> None:
    x0, x_hat = torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4)
    assert float(optimal_coefficient(x0, x_hat, torch.full_like(x0, 0.25))[0]) == pytest.approx(0.25)
    assert float(optimal_coefficient(x0, x_hat, torch.full_like(x0, 1.5))[0]) == 1.0  # beyond x̂: clamped
    assert float(optimal_coefficient(x0, x_hat, torch.full_like(x0, -0.5))[0]) == 0.0
    assert float(optimal_coefficient(x_hat, x_hat, torch.zeros_like(x0))[0]) == 0.0  # x̂ = x0_diff: no direction


def test_corrected_estimate_is_exact_at_both_ends() -> None:
    g = torch.Generator().manual_seed(1)
    x0, x_hat = torch.randn(2, 3, 5, 5, generator=g), torch.randn(2, 3, 5, 5, generator=g)
    assert torch.equal(corrected_estimate(x0, x_hat, 0.0), x0)
    assert torch.equal(corrected_estimate(x0, x_hat, 1.0), x_hat)
    mixed = corrected_estimate(x0, x_hat, torch.tensor([0.0, 1.0]))
    assert torch.equal(mixed[0], x0[0]) and torch.equal(mixed[1], x_hat[1])


def test_knob_anchors_and_monotonicity() -> None:
    lam = torch.tensor([0.0, 0.2, 0.6, 1.0], dtype=torch.float64)
    assert torch.equal(knob_coefficient(lam, 0.0), torch.ones(4, dtype=torch.float64))
    assert torch.equal(knob_coefficient(lam, TRANSMITTED_PERCEPTION), lam)
    assert torch.equal(knob_coefficient(lam, 1.0), torch.zeros(4, dtype=torch.float64))
    sweep = torch.stack([knob_coefficient(lam, p) for p in np.linspace(0.0, 1.0, 41)])
    assert bool((sweep[1:] <= sweep[:-1] + 1e-15).all()) and bool(((sweep >= 0) & (sweep <= 1)).all())
    with pytest.raises(ValueError, match="perception"):
        knob_coefficient(lam, 1.5)


def test_seed_is_the_first_four_bytes_of_the_key_digest() -> None:
    import hashlib

    assert transmitted_seed("a/b") == int.from_bytes(hashlib.sha256(b"a/b").digest()[:4], "little") < 2**32
    assert torch.equal(start_noise([7, 9], (3, 4, 4))[1], start_noise([9], (3, 4, 4))[0])  # batch-independent


# -- the encoder, the bitstream and the decoder ---------------------------------------------------------


@pytest.mark.parametrize("steps, bits", [(3, 4), (2, 8)])
def test_coefficients_survive_the_bitstream_round_trip(codec, decoder, images, steps, bits) -> None:
    """Real v2 bitstreams: the decoder parses the coefficients and replays exactly the encoder's sampler."""
    encoder = compute_corrections(decoder, encoded(codec, images), originals(images), steps=steps, bits=bits)
    plain = codec.encode_batch(images, ["RGB", "RGB"])
    streams = [attach_corrections(data, c) for data, c in zip(plain, encoder.coefficients)]
    payload = 32 + 4 + 1 + 1 + (steps * bits + 7) // 8
    for v1, v2 in zip(plain, streams):
        assert v1[4] == 1 and v2[4] == 2
        assert len(v2) - len(v1) == 1 + 5 + payload + 4  # count, kind+length, payload, CRC32
    parsed = [read_corrections(data) for data in streams]
    assert parsed == list(encoder.coefficients)
    assert all(c.seed == transmitted_seed(k) and c.decoder_sha256 == decoder.identity() for c, k in zip(parsed, KEYS))
    headers, symbols = zip(*(codec.decode_symbols(data) for data in streams))
    out = corrdiff_decode(decoder, codec, headers, symbols, parsed, TRANSMITTED_PERCEPTION)
    for o, replay, size in zip(out, encoder.replay, SIZES):
        assert o.shape == (3, *size) and torch.equal(o, replay)
    assert read_corrections(plain[0]) is None


def test_encoder_quantizes_the_least_squares_coefficients(codec, decoder, images) -> None:
    encoder = compute_corrections(decoder, encoded(codec, images), originals(images), steps=3, bits=4)
    for c, optimum in zip(encoder.coefficients, encoder.optimal):
        assert len(optimum) == 3 and all(0.0 <= v <= 1.0 for v in optimum)
        assert all(abs(q - v) <= 0.5 / 15 + 1e-12 for q, v in zip(c.values, optimum))
    assert len({v for o in encoder.optimal for v in o}) > 1  # the coefficients depend on image and step


def test_perception_zero_returns_the_end_to_end_reconstruction_exactly(codec, decoder, images) -> None:
    batch = encoded(codec, images)
    coefficients = compute_corrections(decoder, batch, originals(images)).coefficients
    out = decode_with_corrections(decoder, batch, coefficients, perception=0.0)
    # bit for bit: λ = 1 makes every corrected estimate x̂ itself, the last DDIM step (ᾱ = 1) returns it,
    # and the output is formed as x̂ + ½(x_0 − x̂), whose correction is then an exact 0
    assert all(torch.equal(o, x) for o, x in zip(out, batch.x_hat))


def test_perception_one_is_the_uncorrected_ddim_sample(codec, decoder, images) -> None:
    batch = encoded(codec, images)
    coefficients = compute_corrections(decoder, batch, originals(images)).coefficients
    out = decode_with_corrections(decoder, batch, coefficients, perception=1.0)
    canvas = canvas_size(batch.padded, TINY_UNET.size_multiple)
    x_hat01 = torch.cat([fit_canvas(x[None], canvas) for x in batch.x_hat])
    with torch.no_grad():  # the plain sampler, no guidance hook, from the transmitted seeds
        noise = start_noise([c.seed for c in coefficients], (3, *canvas))
        x0 = sample_ddim(decoder.denoise_fn(batch.y_hat, canvas), noise, ddim_timesteps(decoder.config.steps))
    expected = x_hat01 + 0.5 * (x0 - to_model_range(x_hat01))
    for i, (h, w) in enumerate(SIZES):
        assert torch.equal(out[i], expected[i, :, :h, :w].clamp(0.0, 1.0))
        assert float((out[i] - batch.x_hat[i]).abs().mean()) > 1e-2  # pure diffusion is not x̂


def test_encoding_and_decoding_are_deterministic_and_batch_independent(codec, decoder, images) -> None:
    batch, x = encoded(codec, images), originals(images)
    first, again = compute_corrections(decoder, batch, x), compute_corrections(decoder, batch, x)
    assert first.coefficients == again.coefficients
    assert all(torch.equal(a, b) for a, b in zip(first.replay, again.replay))
    for p in (0.25, 0.75):
        together = decode_with_corrections(decoder, batch, first.coefficients, p)
        again = decode_with_corrections(decoder, batch, first.coefficients, p)
        assert all(torch.equal(a, b) for a, b in zip(together, again))
        for i in range(2):
            (alone,) = decode_with_corrections(decoder, single(batch, i), first.coefficients[i : i + 1], p)
            assert torch.allclose(together[i], alone, atol=1e-5, rtol=0)
    for i in range(2):  # the encoder alone chooses the same coefficients (no λ* near a rounding boundary here)
        alone = compute_corrections(decoder, single(batch, i), x[i : i + 1])
        assert alone.coefficients[0] == first.coefficients[i]


def test_pipeline_encoder_entry_point(codec, decoder, images) -> None:
    analysed = codec.analyse(images, reconstruct=False)
    coefficients = corrections_for_images(decoder, codec, analysed, images, KEYS)
    assert coefficients == compute_corrections(decoder, encoded(codec, images), originals(images)).coefficients


def test_decoder_refuses_foreign_coefficients_and_codecs(codec, decoder, images) -> None:
    batch = encoded(codec, images)
    coefficients = compute_corrections(decoder, batch, originals(images)).coefficients
    foreign = [dataclasses.replace(c, decoder_sha256="ab" * 32) for c in coefficients]
    with pytest.raises(CorrDiffMismatchError, match="computed for CorrDiff decoder abab"):
        decode_with_corrections(decoder, batch, foreign)
    other = CorrDiffDecoder(decoder.config, TrainedCodec("cd" * 32, "mbt2018-mean", 0.01))
    other.load_state_dict(decoder.state_dict())
    with pytest.raises(CorrDiffMismatchError, match="train corrdiff"):
        compute_corrections(other, batch, originals(images))
    mixed = [coefficients[0], dataclasses.replace(coefficients[1], indexes=(0,) * 5)]
    with pytest.raises(ValueError, match="one step count"):
        decode_with_corrections(decoder, batch, mixed)


def test_checkpoint_round_trip_and_binding(codec, decoder, tmp_path: Path) -> None:
    path = tmp_path / "corrdiff.pt"
    sha = save_corrdiff(decoder, path, {"note": "test"})
    assert sha == decoder.identity()
    loaded = load_corrdiff(path, codec_sha256=codec.model.identity.sha256, expected_sha256=sha)
    assert loaded.sha256 == sha and loaded.config == decoder.config and loaded.provenance == {"note": "test"}
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), decoder.state_dict().values()))
    with pytest.raises(CorrDiffMismatchError, match="not for codec"):
        load_corrdiff(path, codec_sha256="ef" * 32)
    with pytest.raises(CorrDiffError, match="was expected"):
        load_corrdiff(path, expected_sha256="00" * 32)
    torch.save({"format": "ncpipe-refiner/1"}, tmp_path / "refiner.pt")
    with pytest.raises(CorrDiffError, match="not an ncpipe-corrdiff/1 checkpoint"):
        load_corrdiff(tmp_path / "refiner.pt")
    with pytest.raises(CheckpointError, match="no corrdiff named or at"):
        load_corrdiff(tmp_path / "missing.pt")


def test_corrected_bitstream_is_refused_when_damaged(codec, decoder, images) -> None:
    encoder = compute_corrections(decoder, encoded(codec, images), originals(images))
    data = bytearray(attach_corrections(codec.encode_batch(images[:1], ["RGB"])[0], encoder.coefficients[0]))
    data[-6] ^= 0x01  # a coefficient byte
    with pytest.raises(fmt.BitstreamError, match="CRC32 mismatch in extension 0"):
        read_corrections(bytes(data))


def test_per_channel_coefficients_are_least_squares_per_channel() -> None:
    g = torch.Generator().manual_seed(3)
    x0, x_hat, x = (torch.rand(2, 3, 8, 8, generator=g) for _ in range(3))
    lam = optimal_coefficient(x0, x_hat, x, per_channel=True)
    assert lam.shape == (2, 3)
    for i in range(2):
        for c in range(3):
            assert float(lam[i, c]) == pytest.approx(float(optimal_coefficient(
                x0[i : i + 1, c : c + 1], x_hat[i : i + 1, c : c + 1], x[i : i + 1, c : c + 1])[0]), abs=1e-12)
    per_channel = ((corrected_estimate(x0, x_hat, lam) - x) ** 2).sum()
    shared = ((corrected_estimate(x0, x_hat, optimal_coefficient(x0, x_hat, x)) - x) ** 2).sum()
    assert float(per_channel) <= float(shared) + 1e-9  # a finer correction is never worse on the encoder's image


@pytest.mark.parametrize("multiscale", [False, True])
def test_per_channel_and_multiscale_decoders_round_trip_every_bit(codec, images, multiscale: bool) -> None:
    """3K coefficients in the bitstream (counted in its bytes); the decoder replays the encoder exactly; the
    multi-scale conditioning has one map per level and changes the estimate."""
    torch.manual_seed(0)
    identity = codec.model.identity
    config = CorrDiffConfig(latent_channels=24, unet=TINY_UNET, latent_features=2, conditioner_hidden=8, steps=2,
                            coefficient_groups=3, multiscale=multiscale)
    decoder = perturbed(CorrDiffDecoder(config, TrainedCodec(identity.sha256, identity.arch, identity.rate)),
                        scale=0.02).eval()
    assert config.max_steps == 21 and (decoder.denoiser.net.scale_in is not None) == multiscale
    batch = encoded(codec, images)
    encoder = compute_corrections(decoder, batch, originals(images), bits=4)
    assert all(len(c.indexes) == 6 for c in encoder.coefficients)
    plain = codec.encode_batch(images, ["RGB", "RGB"])
    streams = [attach_corrections(data, c) for data, c in zip(plain, encoder.coefficients)]
    assert all(len(v2) - len(v1) == 1 + 5 + 38 + (6 * 4 + 7) // 8 + 4 for v1, v2 in zip(plain, streams))
    headers, symbols = zip(*(codec.decode_symbols(data) for data in streams))
    parsed = [read_corrections(data) for data in streams]
    out = corrdiff_decode(decoder, codec, headers, symbols, parsed, TRANSMITTED_PERCEPTION)
    assert all(torch.equal(o, r) for o, r in zip(out, encoder.replay))
    if multiscale:
        canvas = canvas_size(batch.padded, TINY_UNET.size_multiple)
        maps = decoder.conditioner.pyramid(batch.y_hat, canvas, 2)
        assert [tuple(m.shape[-2:]) for m in maps] == [canvas, (canvas[0] // 2, canvas[1] // 2)]
        x_t, t = torch.zeros(2, 3, *canvas), torch.full((2,), 0.5)
        with torch.no_grad():
            before = decoder.denoise_fn(batch.y_hat, canvas)(x_t, t)
            for conv in decoder.denoiser.net.scale_in:
                conv.weight.zero_()
            assert not torch.allclose(before, decoder.denoise_fn(batch.y_hat, canvas)(x_t, t))
        with pytest.raises(ValueError, match="coarser"):
            CorrDiffConfig(latent_channels=24, unet=dataclasses.replace(TINY_UNET, channel_mults=(1, 1, 1, 1, 1, 1)),
                           multiscale=True)
