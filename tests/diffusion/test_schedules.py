"""Schedules and forward processes: endpoints, monotonicity, lengths, exact update rules."""

from __future__ import annotations

import pytest
import torch

from ncpipe.diffusion.schedules import (
    bridge_forward,
    bridge_step,
    cosine_alpha_bar,
    ddim_step,
    ddim_timesteps,
    eta_schedule,
    gaussian_forward,
)

KINDS = [
    ("geometric", {}),
    ("geometric", {"power": 0.3, "eta_min": 0.001}),
    ("linear", {}),
    ("polynomial", {"power": 2.0}),
]


@pytest.mark.parametrize("num_steps", [1, 2, 4, 15])
@pytest.mark.parametrize("kind,kwargs", KINDS)
def test_eta_schedule_length_endpoints_monotone(num_steps: int, kind: str, kwargs: dict) -> None:
    etas = eta_schedule(num_steps, kind, **kwargs)
    assert etas.shape == (num_steps + 1,)
    assert etas[0].item() == 0.0 and etas[-1].item() == 1.0
    assert torch.all(etas[1:] > etas[:-1])


def test_geometric_first_step_is_eta_min() -> None:
    assert eta_schedule(8, "geometric", eta_min=0.01)[1].item() == pytest.approx(0.01)


@pytest.mark.parametrize("bad", [dict(num_steps=0), dict(num_steps=4, kind="cubic"), dict(num_steps=4, eta_min=1.0)])
def test_eta_schedule_rejects_bad_arguments(bad: dict) -> None:
    with pytest.raises(ValueError):
        eta_schedule(**bad)


def test_bridge_forward_endpoints_are_exact() -> None:
    x0, x_hat = torch.rand(2, 3, 5, 7) * 2 - 1, torch.rand(2, 3, 5, 7) * 2 - 1
    assert torch.equal(bridge_forward(x0, x_hat, 0.0), x0)
    assert torch.equal(bridge_forward(x0, x_hat, 1.0), x_hat)
    mixed = bridge_forward(x0, x_hat, torch.tensor([0.0, 1.0]))  # η per sample
    assert torch.equal(mixed[0], x0[0]) and torch.equal(mixed[1], x_hat[1])


def test_bridge_forward_noise_term() -> None:
    x0, x_hat, noise = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    assert torch.allclose(bridge_forward(x0, x_hat, 0.25, noise, kappa=2.0), torch.full_like(x0, 0.25 + 2.0 * 0.5))
    with pytest.raises(ValueError):
        bridge_forward(x0, x_hat, 0.25, kappa=2.0)


def test_bridge_step_kappa0_is_the_nc_diffusion_update() -> None:
    g = torch.Generator().manual_seed(0)
    x_t, x0_hat, x_hat = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    expected = x0_hat + 0.3 * (x_t - x0_hat) / 0.6
    assert torch.allclose(bridge_step(x_t, x0_hat, x_hat, 0.6, 0.3), expected, atol=1e-6)


def test_bridge_step_keeps_marginal_with_kappa() -> None:
    """With the true x0 and true noise, a κ > 0 step lands exactly on the η_{t-1} marginal."""
    g = torch.Generator().manual_seed(1)
    x0, x_hat, eps = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    x_t = bridge_forward(x0, x_hat, 0.5, eps, kappa=0.3)
    stepped = bridge_step(x_t, x0, x_hat, 0.5, 0.2, kappa=0.3)
    assert torch.allclose(stepped, bridge_forward(x0, x_hat, 0.2, eps, kappa=0.3), atol=1e-6)


def test_cosine_alpha_bar_endpoints_and_monotone() -> None:
    t = torch.linspace(0, 1, 101)
    ab = cosine_alpha_bar(t)
    assert ab[0].item() == 1.0 and ab[-1].item() < 1e-8
    assert torch.all(ab[1:] < ab[:-1])


def test_ddim_timesteps() -> None:
    ts = ddim_timesteps(5)
    assert ts.shape == (6,) and ts[0].item() == 1.0 and ts[-1].item() == 0.0
    assert torch.all(ts[1:] < ts[:-1])


def test_ddim_step_to_t0_returns_estimate_exactly() -> None:
    x_t, x0_hat = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    out = ddim_step(x_t, x0_hat, cosine_alpha_bar(torch.tensor(0.4)), cosine_alpha_bar(torch.tensor(0.0)))
    assert torch.equal(out, x0_hat)


def test_ddim_step_keeps_marginal_with_true_x0() -> None:
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t, s = torch.full((2,), 0.7), torch.full((2,), 0.3)
    stepped = ddim_step(gaussian_forward(x0, t, eps), x0, cosine_alpha_bar(t), cosine_alpha_bar(s))
    assert torch.allclose(stepped, gaussian_forward(x0, s, eps), atol=1e-5)


@pytest.mark.parametrize("kind,kwargs", KINDS)
def test_continuous_levels_cover_every_samplers_levels(kind: str, kwargs: dict) -> None:
    """Every level a K-step sampler queries (η_1..η_K) lies in the continuous family's range, and a
    continuous draw reaches levels that no 4-step schedule holds."""
    from ncpipe.diffusion.objectives import continuous_bridge_training_batch
    from ncpipe.diffusion.schedules import continuous_eta

    grid = continuous_eta(torch.linspace(0.0, 1.0, 10_001), kind, **kwargs)
    assert bool((grid[1:] >= grid[:-1]).all()) and float(grid[-1]) == pytest.approx(1.0)
    for k in (1, 2, 3, 4, 8):
        levels = eta_schedule(k, kind, **kwargs)[1:]
        assert float(levels.min()) >= float(grid.min()) - 1e-12 and float(levels.max()) <= 1.0 + 1e-12
        gaps = (levels[:, None] - grid[None]).abs().min(dim=1).values
        assert float(gaps.max()) < 1e-3  # the continuous grid passes next to every sampler level

    x0, x_hat = torch.zeros(64, 1, 2, 2), torch.ones(64, 1, 2, 2)
    batch = continuous_bridge_training_batch(
        x0, x_hat, lambda u: continuous_eta(u, kind, **kwargs), torch.Generator().manual_seed(0))
    assert torch.equal(batch.x_t[:, 0, 0, 0], batch.t)  # x_t = x0 + η(x̂ − x0) with x0 = 0, x̂ = 1
    four_step = eta_schedule(4, kind, **kwargs).float()
    unseen = (batch.t[:, None] - four_step[None]).abs().min(dim=1).values > 1e-4
    assert int(unseen.sum()) > 32
