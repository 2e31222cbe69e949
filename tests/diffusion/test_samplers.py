"""Samplers: oracle exactness, determinism, batch equals single, seeded noise."""

from __future__ import annotations

import pytest
import torch

from ncpipe.diffusion.samplers import SamplerStep, sample_bridge, sample_ddim, seeded_noise
from ncpipe.diffusion.schedules import bridge_forward, ddim_timesteps, eta_schedule, gaussian_forward
from ncpipe.diffusion.unet import Denoiser


def _images(seed: int, n: int = 3, hw: int = 8) -> torch.Tensor:
    return torch.rand(n, 3, hw, hw, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("num_steps", [1, 2, 4, 8])
@pytest.mark.parametrize("kind", ["geometric", "linear"])
def test_bridge_with_oracle_returns_x0_and_walks_the_marginals(num_steps: int, kind: str) -> None:
    x0, x_hat = _images(0), _images(1)
    etas = eta_schedule(num_steps, kind)
    steps: list[SamplerStep] = []
    out = sample_bridge(lambda x_t, t: x0, x_hat, etas, callback=steps.append)
    assert torch.equal(out, x0)
    assert len(steps) == num_steps and [s.index for s in steps] == list(range(num_steps))
    for s in steps:  # t = η and x_t on the forward path
        assert torch.allclose(s.x_t, bridge_forward(x0, x_hat, s.t), atol=1e-6)


def test_bridge_with_oracle_and_kappa_returns_x0() -> None:
    x0, x_hat = _images(0), _images(1)
    assert torch.equal(sample_bridge(lambda x_t, t: x0, x_hat, eta_schedule(4), kappa=0.1), x0)


def test_bridge_rejects_schedule_not_ending_at_one() -> None:
    with pytest.raises(ValueError):
        sample_bridge(lambda x_t, t: x_t, _images(0), torch.tensor([0.0, 0.5]))


@pytest.mark.parametrize("num_steps", [1, 3, 10])
def test_ddim_with_oracle_returns_x0_and_keeps_noise(num_steps: int) -> None:
    x0, noise = _images(0), torch.randn(3, 3, 8, 8)
    steps: list[SamplerStep] = []
    out = sample_ddim(lambda x_t, t: x0, noise, ddim_timesteps(num_steps), callback=steps.append)
    assert torch.equal(out, x0)
    for s in steps:  # deterministic DDIM keeps the same ε along the way
        assert torch.allclose(s.x_t, gaussian_forward(x0, s.t, noise), atol=1e-5)


def test_guidance_hook_sees_every_step_and_can_replace_the_estimate() -> None:
    x0, x_hat = _images(0), _images(1)
    seen: list[int] = []

    def guidance(x0_hat: torch.Tensor, i: int) -> torch.Tensor:
        seen.append(i)
        return x0  # a perfect correction, as CorrDiff's λ = 1 with x̂ = x0 would be

    out = sample_bridge(lambda x_t, t: torch.zeros_like(x_t), x_hat, eta_schedule(3), guidance=guidance)
    assert seen == [0, 1, 2] and torch.equal(out, x0)
    seen.clear()
    out = sample_ddim(lambda x_t, t: torch.zeros_like(x_t), torch.randn_like(x0), ddim_timesteps(2), guidance=guidance)
    assert seen == [0, 1] and torch.equal(out, x0)


def _run_both(denoiser: Denoiser, cond: torch.Tensor, keys: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    denoise = denoiser.bind(cond)
    with torch.no_grad():
        bridge = sample_bridge(denoise, cond, eta_schedule(3))
        ddim = sample_ddim(denoise, seeded_noise(keys, cond.shape[1:]), ddim_timesteps(3))
    return bridge, ddim


def test_samplers_are_deterministic(tiny_denoiser: Denoiser) -> None:
    cond, keys = _images(2), ["a", "b", "c"]
    first, second = _run_both(tiny_denoiser, cond, keys), _run_both(tiny_denoiser, cond, keys)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], cond)  # the (perturbed) network did change the image


def test_samplers_batch_equals_single_bit_for_bit() -> None:
    """The samplers and the noise add nothing that mixes samples: exact with a per-sample denoiser."""
    cond, keys = _images(3), ["img-0", "img-1", "img-2"]

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.tanh(1.5 * x_t) * (1 - t.view(-1, 1, 1, 1)) - 0.1

    def run(c: torch.Tensor, k: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        noise = seeded_noise(k, c.shape[1:])
        return sample_bridge(denoise, c, eta_schedule(4)), sample_ddim(denoise, noise, ddim_timesteps(4))

    batch = run(cond, keys)
    for which in range(2):
        assert torch.equal(batch[which], torch.cat([run(cond[i : i + 1], keys[i : i + 1])[which] for i in range(3)]))


def test_unet_batch_equals_single(tiny_denoiser: Denoiser) -> None:
    """GroupNorm and AFFM pooling are per-sample; only kernel choice may round differently.

    BLAS (linear layers) and oneDNN (convs) pick different kernels for batch 1 and batch 3, so
    the results agree to float rounding (about 1e-6), not bit for bit.
    """
    cond, keys = _images(3), ["img-0", "img-1", "img-2"]
    batch = _run_both(tiny_denoiser, cond, keys)
    singles = [_run_both(tiny_denoiser, cond[i : i + 1], keys[i : i + 1]) for i in range(3)]
    for which in range(2):
        assert torch.allclose(batch[which], torch.cat([s[which] for s in singles]), atol=1e-5, rtol=0)


def test_seeded_noise_depends_only_on_the_key() -> None:
    together = seeded_noise(["x", "y", "z"], (3, 4, 5))
    assert together.shape == (3, 3, 4, 5) and together.dtype == torch.float32
    assert torch.equal(together[1:2], seeded_noise(["y"], (3, 4, 5)))
    assert torch.equal(together[2], seeded_noise(["w", "z"], (3, 4, 5))[1])
    assert not torch.equal(together[0], together[1])
    assert seeded_noise([], (3, 4, 5)).shape == (0, 3, 4, 5)
