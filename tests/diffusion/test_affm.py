"""AFFM: shape/dtype kept for any size, exact identity at init, learns away from identity, ablation."""

from __future__ import annotations

import pytest
import torch

from ncpipe.diffusion.affm import AFFM, SkipIdentity, make_affm


@pytest.mark.parametrize("hw", [(8, 8), (7, 9), (6, 5), (1, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_shape_dtype_and_identity_at_init(hw: tuple[int, int], dtype: torch.dtype) -> None:
    affm = AFFM(channels=4, emb_dim=6)
    s = torch.randn(2, 4, *hw).to(dtype)
    out = affm(s, torch.randn(2, 6))
    assert out.shape == s.shape and out.dtype == dtype
    assert torch.equal(out, s)  # exact: the filter adds irfft2(0) = 0


def _trained_one_step(affm: AFFM, s: torch.Tensor, emb: torch.Tensor) -> None:
    opt = torch.optim.SGD(affm.parameters(), lr=0.5)
    target = torch.fft.irfft2(torch.fft.rfft2(s) * 2.0, s=s.shape[-2:])  # ask for an amplification
    loss = (affm(s, emb) - target).pow(2).mean()
    loss.backward()
    opt.step()


def test_not_identity_after_a_gradient_step() -> None:
    torch.manual_seed(0)
    affm, s, emb = AFFM(channels=4, emb_dim=6), torch.randn(2, 4, 9, 10), torch.randn(2, 6)
    _trained_one_step(affm, s, emb)
    assert affm.static.abs().max() > 0  # static response learns from step one …
    assert affm.mlp[-1].weight.abs().max() > 0  # … and so does the adaptive part
    with torch.no_grad():
        assert (affm(s, emb) - s).abs().max() > 1e-4


def test_filter_is_input_adaptive_after_training() -> None:
    torch.manual_seed(0)
    affm = AFFM(channels=4, emb_dim=6)
    s, emb = torch.randn(2, 4, 8, 8), torch.randn(2, 6)
    _trained_one_step(affm, s, emb)
    with torch.no_grad():
        g = affm.log_gain(s, emb)
        g_other_emb = affm.log_gain(s, torch.randn(2, 6))
    assert (g - g_other_emb).abs().max() > 0


def test_works_under_autocast() -> None:
    affm = AFFM(channels=4, emb_dim=0)
    s = torch.randn(1, 4, 6, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = affm(s)
    assert out.dtype == s.dtype and torch.equal(out, s)


def test_disabled_is_identity_module() -> None:
    skip = make_affm(4, 6, enabled=False)
    assert isinstance(skip, SkipIdentity) and isinstance(skip, torch.nn.Identity)
    s = torch.randn(1, 4, 5, 5)
    assert skip(s, torch.randn(1, 6)) is s
    assert isinstance(make_affm(4, 6), AFFM)
