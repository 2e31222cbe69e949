"""Zero-shot sample guidance: bin violation goes down, in-bin estimates stay, per-image steps, the real g_a."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ncpipe.codec import LearnedCodec
from ncpipe.diffusion.guidance import (
    GuidanceConfig,
    SampleGuidance,
    bin_violation,
    encoder_input,
    latent_consistency_step,
    low_frequency_step,
    violation_energy,
)
from ncpipe.diffusion.samplers import sample_bridge
from ncpipe.diffusion.schedules import eta_schedule
from ncpipe.diffusion.unet import to_model_range
from ncpipe.models.checkpoint import load_codec_model
from tests.factories import kodak_pixels

PADDED = (32, 32)


def toy_analysis() -> torch.nn.Module:
    """A fixed nonlinear 'g_a': two strided convs with a softplus, 3 -> 6 channels at 1/4 resolution."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, stride=2, padding=1), torch.nn.Softplus(),
                              torch.nn.Conv2d(8, 6, 4, stride=2, padding=1))
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(4.0)  # latents of a few units, so rounding bins are meaningful
    return net.requires_grad_(False)


def toy_problem(n: int = 2, seed: int = 1):
    """(g_a, x_true in [-1,1], ŷ = round(g_a(x_true)) quantized like the encoder, a perturbed estimate)."""
    analysis = toy_analysis()
    g = torch.Generator().manual_seed(seed)
    x_true = F.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=PADDED, mode="bilinear") * 2 - 1
    sizes = ((32, 32),) * n
    y_hat = torch.round(analysis(encoder_input((x_true + 1) / 2, sizes, PADDED)))
    estimate = x_true + 0.3 * torch.randn(x_true.shape, generator=g)
    return analysis, x_true, y_hat, sizes, estimate


def test_the_original_lies_inside_every_bin_and_the_estimate_does_not() -> None:
    analysis, x_true, y_hat, sizes, estimate = toy_problem()
    assert torch.equal(violation_energy(analysis, x_true, y_hat, sizes, PADDED), torch.zeros(2))
    assert bool((violation_energy(analysis, estimate, y_hat, sizes, PADDED) > 0).all())


@pytest.mark.parametrize("strength", [0.25, 0.5, 1.0])
def test_a_latent_step_reduces_the_bin_violation(strength: float) -> None:
    analysis, _, y_hat, sizes, estimate = toy_problem()
    stepped, before = latent_consistency_step(analysis, estimate, y_hat, sizes, PADDED, strength)
    after = violation_energy(analysis, stepped, y_hat, sizes, PADDED)
    assert torch.equal(before, violation_energy(analysis, estimate, y_hat, sizes, PADDED))
    assert bool((after < before).all()), (before, after)


def test_repeated_steps_keep_reducing_the_violation() -> None:
    analysis, _, y_hat, sizes, x = toy_problem()
    energies = [violation_energy(analysis, x, y_hat, sizes, PADDED)]
    for _ in range(5):
        x, _ = latent_consistency_step(analysis, x, y_hat, sizes, PADDED, 0.5)
        energies.append(violation_energy(analysis, x, y_hat, sizes, PADDED))
    assert all(bool((b < a).all()) for a, b in zip(energies, energies[1:]))
    assert bool((energies[-1] < 0.3 * energies[0]).all())


def test_an_estimate_inside_its_bins_is_left_unchanged() -> None:
    analysis, x_true, y_hat, sizes, _ = toy_problem()
    stepped, energy = latent_consistency_step(analysis, x_true, y_hat, sizes, PADDED, 1.0)
    assert torch.equal(energy, torch.zeros(2)) and torch.equal(stepped, x_true)


def test_step_length_is_per_image() -> None:
    analysis, _, y_hat, sizes, estimate = toy_problem(n=3)
    together, _ = latent_consistency_step(analysis, estimate, y_hat, sizes, PADDED, 0.5)
    for i in range(3):
        alone, _ = latent_consistency_step(analysis, estimate[i : i + 1], y_hat[i : i + 1], sizes[:1], PADDED, 0.5)
        assert torch.allclose(together[i : i + 1], alone, atol=1e-5, rtol=0)


def test_encoder_input_replicates_edges_like_the_encoder() -> None:
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    out = encoder_input(x, ((2, 3), (4, 5)), (4, 6))
    assert out.shape == (2, 3, 4, 6)
    assert torch.equal(out[0, :, :2, :3], x[0, :, :2, :3]) and torch.equal(out[0, :, 3, 5], x[0, :, 1, 2])
    assert torch.equal(out[1, :, :, :5], x[1]) and torch.equal(out[1, :, :, 5], x[1, :, :, 4])


def test_bin_violation_has_a_dead_zone() -> None:
    y_hat = torch.zeros(4)
    expected = torch.tensor([0.0, 0.0, 0.25, 1.5])
    assert torch.allclose(bin_violation(torch.tensor([0.0, 0.5, -0.75, 2.0]), y_hat), expected)


def test_low_frequency_step_pulls_block_means_to_x_hat() -> None:
    g = torch.Generator().manual_seed(0)
    x0, x_hat = torch.rand(1, 3, 32, 32, generator=g), torch.rand(1, 3, 32, 32, generator=g)
    before = (F.avg_pool2d(x0, 16) - F.avg_pool2d(x_hat, 16)).abs().mean()
    after = (F.avg_pool2d(low_frequency_step(x0, x_hat, 1.0, 16), 16) - F.avg_pool2d(x_hat, 16)).abs().mean()
    assert after < 0.5 * before
    assert torch.equal(low_frequency_step(x0, x_hat, 0.0, 16), x0)


def test_hook_records_energies_from_first_step_and_needs_g_a() -> None:
    analysis, _, y_hat, sizes, estimate = toy_problem()
    hook = SampleGuidance(GuidanceConfig(strength=0.5, first_step=1), analysis, y_hat, estimate, sizes, PADDED)
    assert torch.equal(hook(estimate, 0), estimate) and not hook.energies
    hook(estimate, 1)
    assert [step for step, _ in hook.energies] == [1]
    with pytest.raises(ValueError, match="g_a"):
        SampleGuidance(GuidanceConfig(strength=0.5), None, None, estimate, sizes, PADDED)


def test_config_validation() -> None:
    assert not GuidanceConfig(strength=0.0).enabled and GuidanceConfig(strength=0.0, low_frequency=0.5).enabled
    for bad in ({"strength": -0.1}, {"strength": 3.0}, {"low_frequency": 1.5}, {"low_pass": 0}):
        with pytest.raises(ValueError):
            GuidanceConfig(**bad)


def test_guided_bridge_moves_the_real_codec_reconstruction_into_its_bins(tiny_model_path: Path) -> None:
    """With the real tiny codec's g_a: the original has no violation, x̂ has some, guidance removes part."""
    codec = LearnedCodec(load_codec_model(tiny_model_path), coder_threads=1)
    pixels = kodak_pixels(1, (64, 96))
    data = codec.encode_batch([pixels], ["RGB"])[0]
    header, symbols = codec.decode_symbols(data)
    from ncpipe.diffusion.refiner import decoded_batch

    batch = decoded_batch(codec, [header], [symbols])
    analysis = lambda x: codec.model.adapter.analysis(x)[0]  # noqa: E731
    x_hat = to_model_range(batch.x_hat[0][None])
    original = to_model_range(torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255)
    args = (batch.y_hat, batch.sizes, batch.padded)
    assert float(violation_energy(analysis, original, *args)[0]) < 1e-6
    e_hat = float(violation_energy(analysis, x_hat, *args)[0])
    assert e_hat > 0
    hook = SampleGuidance(GuidanceConfig(strength=0.5), analysis, batch.y_hat, x_hat, batch.sizes, batch.padded)
    with torch.no_grad():
        out = sample_bridge(lambda x_t, t: x_t, x_hat, eta_schedule(4), guidance=hook)  # identity denoiser
    assert float(violation_energy(analysis, out, *args)[0]) < 0.8 * e_hat
    codec.close()


def test_bins_scale_with_the_quantization_step() -> None:
    """A bin is [ŷ − Δ/2, ŷ + Δ/2]: half-step wide per channel, and Δ = 1 is the fixed-rate bin."""
    y_hat = torch.zeros(1, 2, 1, 2)
    y = torch.tensor([[[[0.4, 1.0]], [[0.4, 1.0]]]])
    steps = torch.tensor([0.5, 4.0]).view(1, 2, 1, 1)
    expected = torch.tensor([[[[0.15, 0.75]], [[0.0, 0.0]]]])
    assert torch.allclose(bin_violation(y, y_hat, steps), expected)
    assert torch.equal(bin_violation(y, y_hat, 1.0), bin_violation(y, y_hat))


def test_variable_rate_bitstreams_put_the_original_inside_its_quality_bins(tiny_vbr_model_path: Path) -> None:
    """The real variable-rate codec: at the lowest and highest quality the original re-encodes inside
    the Δ_q bins the decoded batch carries."""
    from ncpipe.diffusion.refiner import bin_steps, decoded_batch

    codec = LearnedCodec(load_codec_model(tiny_vbr_model_path), coder_threads=1)
    pixels = kodak_pixels(1, (64, 96))
    analysis = lambda x: codec.model.adapter.analysis(x)[0]  # noqa: E731
    original = to_model_range(torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255)
    for quality in (1, len(codec.model.quality.lambdas)):
        data = codec.encode_batch([pixels], ["RGB"], quality=quality)[0]
        header, symbols = codec.decode_symbols(data)
        batch = decoded_batch(codec, [header], [symbols])
        steps = bin_steps(codec, batch)
        assert batch.qualities == (quality,)
        assert torch.equal(steps, codec.model.quality.steps[quality - 1].view(1, -1, 1, 1))
        args = (batch.y_hat, batch.sizes, batch.padded)
        assert float(violation_energy(analysis, original, *args, steps)[0]) < 1e-6
    codec.close()
