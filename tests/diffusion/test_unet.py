"""U-Net: interface with and without AFFM, conditioning, size rules, identity start, a tiny training run."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from ncpipe.diffusion.affm import AFFM, SkipIdentity
from ncpipe.diffusion.objectives import bridge_training_batch, gaussian_training_batch
from ncpipe.diffusion.samplers import sample_bridge
from ncpipe.diffusion.schedules import eta_schedule
from ncpipe.diffusion.unet import Denoiser, UNet, UNetConfig, from_model_range, to_model_range
from tests.diffusion.conftest import TINY, perturbed


@pytest.mark.parametrize("affm", [True, False])
@pytest.mark.parametrize("hw", [(8, 8), (12, 6)])
def test_same_interface_with_and_without_affm(affm: bool, hw: tuple[int, int]) -> None:
    cfg = dataclasses.replace(TINY, affm=affm)
    net = perturbed(UNet(cfg))
    kinds = {type(m) for m in net.skip_filters}
    assert kinds == ({AFFM} if affm else {SkipIdentity})
    x, cond = torch.randn(2, 3, *hw), torch.randn(2, 3, *hw)
    assert net(x, torch.rand(2), cond).shape == x.shape


def test_three_levels_and_multiple_blocks() -> None:
    cfg = UNetConfig(base_channels=8, channel_mults=(1, 2, 2), blocks_per_level=2, time_embed_dim=16)
    assert cfg.size_multiple == 4
    x = torch.randn(1, 3, 12, 20)
    assert UNet(cfg)(x, torch.rand(1), x).shape == x.shape


def test_rejects_sizes_not_a_multiple_and_bad_time_shape() -> None:
    net, x = UNet(TINY), torch.randn(1, 3, 9, 8)
    with pytest.raises(ValueError, match="multiples of 2"):
        net(x, torch.rand(1), x)
    with pytest.raises(ValueError, match="shape"):
        net(torch.randn(1, 3, 8, 8), torch.rand(()), torch.randn(1, 3, 8, 8))


def test_cond_vector_changes_the_output() -> None:
    net = perturbed(UNet(dataclasses.replace(TINY, cond_vector_dim=2))).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        a = net(x, torch.rand(1), x, torch.tensor([[0.1, 1.0]]))
        b = net(x, torch.rand(1), x, torch.tensor([[0.5, 1.0]]))
    assert not torch.equal(a, b)
    with pytest.raises(ValueError, match="cond_vector"):
        net(x, torch.rand(1), x)


def test_unconditional_net() -> None:
    net = UNet(dataclasses.replace(TINY, cond_channels=0))
    x = torch.randn(1, 3, 8, 8)
    assert net(x, torch.rand(1)).shape == x.shape


def test_untrained_residual_denoiser_returns_x_t() -> None:
    """Zero-initialised output conv: the untrained refiner starts as the codec (x0_hat = x_t = x̂)."""
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(Denoiser(UNet(TINY))(x, torch.rand(2), x), x)
    assert torch.equal(Denoiser(UNet(TINY), "x0")(x, torch.rand(2), x), torch.zeros_like(x))


def test_model_range_round_trip() -> None:
    x = torch.rand(1, 3, 4, 4)
    assert torch.allclose(from_model_range(to_model_range(x)), x)
    assert to_model_range(torch.tensor([0.0, 1.0])).tolist() == [-1.0, 1.0]


def _toy_restoration(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth random images x0 and a codec-like x̂: blurred, contrast-reduced, a little noise; [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    x0 = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(16, 16), mode="bilinear", align_corners=False)
    x_hat = 0.8 * F.avg_pool2d(x0, 3, stride=1, padding=1, count_include_pad=False) + 0.1
    x_hat = x_hat + 0.02 * torch.randn(x0.shape, generator=g)
    return to_model_range(x0), to_model_range(x_hat)


@pytest.mark.parametrize("process", ["bridge", "gaussian"])
def test_tiny_unet_training_loss_decreases(process: str) -> None:
    torch.manual_seed(0)
    denoiser = Denoiser(UNet(TINY), "residual" if process == "bridge" else "x0")
    opt = torch.optim.Adam(denoiser.parameters(), lr=3e-3)
    x0, x_hat = _toy_restoration(8, seed=1)
    etas, gen = eta_schedule(4), torch.Generator().manual_seed(2)
    losses = []
    for _ in range(30):
        if process == "bridge":
            batch = bridge_training_batch(x0, x_hat, etas, generator=gen)
        else:
            batch = gaussian_training_batch(x0, generator=gen)
        loss = F.mse_loss(denoiser(batch.x_t, batch.t, x_hat), batch.target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    if process == "bridge":  # end to end: 4 sampler steps from x̂ beat x̂ on held-out images
        x0_test, x_hat_test = _toy_restoration(8, seed=5)
        with torch.no_grad():
            refined = sample_bridge(denoiser.eval().bind(x_hat_test), x_hat_test, eta_schedule(4))
        assert F.mse_loss(refined, x0_test) < 0.7 * F.mse_loss(x_hat_test, x0_test)


def test_training_batches_shapes_and_ranges() -> None:
    x0, x_hat = _toy_restoration(4, seed=0)
    etas = eta_schedule(4)
    b = bridge_training_batch(x0, x_hat, etas, generator=torch.Generator().manual_seed(0))
    assert b.x_t.shape == x0.shape and b.t.shape == (4,) and torch.equal(b.target, x0)
    assert all(any(float(t) == pytest.approx(float(e)) for e in etas[1:]) for t in b.t)
    again = bridge_training_batch(x0, x_hat, etas, generator=torch.Generator().manual_seed(0))
    assert torch.equal(b.x_t, again.x_t)
    g = gaussian_training_batch(x0, generator=torch.Generator().manual_seed(0))
    assert g.x_t.shape == x0.shape and bool(((g.t >= 0) & (g.t < 1)).all())
