"""A tiny U-Net (about 24k parameters) that runs in milliseconds on a CPU, on one thread."""

from __future__ import annotations

import pytest
import torch

from ncpipe.codec import LearnedCodec
from ncpipe.diffusion.unet import Denoiser, UNet, UNetConfig

TINY = UNetConfig(base_channels=8, channel_mults=(1, 2), time_embed_dim=32)
# Two sizes that pad to the same 64x128 codec canvas: one batch, different crops.
SIZES = ((50, 100), (64, 90))


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread: None) -> None:
    """Every test here runs torch on one thread (tests/conftest.py says why)."""


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


@pytest.fixture(scope="module")
def codec(tiny_codec: LearnedCodec) -> LearnedCodec:
    return tiny_codec
