"""A tiny U-Net (about 24k parameters) that runs in milliseconds on a CPU, on one thread."""

from __future__ import annotations

from typing import Iterator

import pytest
import torch

from ncpipe.diffusion.unet import Denoiser, UNet, UNetConfig

TINY = UNetConfig(base_channels=8, channel_mults=(1, 2), time_embed_dim=32)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tensors here are tiny: intra-op threads only add sync cost, 30x on a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def perturbed(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Nudge every weight so zero-initialised layers (output conv, AFFM) do real work in the test."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module


@pytest.fixture
def tiny_denoiser() -> Denoiser:
    torch.manual_seed(0)
    return perturbed(Denoiser(UNet(TINY))).eval()
