"""``ncpipe evaluate-corrdiff`` on a tiny codec and decoder: real v2 bitstreams, knob endpoints in the
rows, outputs written, and the perceptual-weights lookup."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ncpipe.codec import LearnedCodec
from ncpipe.diffusion.corrdiff import CorrDiffConfig, CorrDiffDecoder, save_corrdiff
from ncpipe.diffusion.refiner import TrainedCodec
from ncpipe.diffusion.unet import UNetConfig
from ncpipe.evaluation.corrdiff_eval import CorrDiffEvalConfig, evaluate_corrdiff
from ncpipe.evaluation.perceptual import METRIC_WEIGHTS_ENV, perceptual_message, perceptual_weights
from ncpipe.models.checkpoint import load_codec_model
from tests.diffusion.conftest import perturbed
from tests.factories import kodak_pixels

pytestmark = pytest.mark.usefixtures("one_torch_thread")



def test_evaluation_rows_and_outputs(tiny_model_path: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(METRIC_WEIGHTS_ENV, str(tmp_path / "no-weights"))
    identity = LearnedCodec(load_codec_model(tiny_model_path), coder_threads=1).model.identity
    torch.manual_seed(0)
    unet = UNetConfig(base_channels=8, channel_mults=(1, 2), time_embed_dim=32)
    config = CorrDiffConfig(latent_channels=24, unet=unet, latent_features=2, conditioner_hidden=8, steps=2, bits=4)
    trained_for = TrainedCodec(identity.sha256, identity.arch, identity.rate)
    decoder = perturbed(CorrDiffDecoder(config, trained_for), scale=0.02)
    save_corrdiff(decoder.eval(), tmp_path / "corrdiff.pt", {})
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(kodak_pixels(3, (64, 96))).save(images / "a.png")
    rows, written = evaluate_corrdiff(CorrDiffEvalConfig(
        codec=str(tiny_model_path), corrdiff=str(tmp_path / "corrdiff.pt"), images=str(images),
        output=str(tmp_path / "out"), perceptions=(0.0, 0.5, 1.0), device="cpu"))
    codec_row = next(r for r in rows if r.method == "codec")
    sweep = {r.perception: r for r in rows if r.method == "corrdiff"}
    assert set(sweep) == {0.0, 0.5, 1.0} and math.isnan(codec_row.perception)
    assert sweep[0.0].psnr == codec_row.psnr and sweep[0.0].hf_ratio == codec_row.hf_ratio  # p = 0 is x̂
    assert all(r.num_bytes - codec_row.num_bytes == r.coefficient_bytes == 10 + 38 + 1 for r in sweep.values())
    assert sweep[0.5].replay_match and sweep[0.0].mean_lambda == 1.0 and sweep[1.0].mean_lambda == 0.0
    assert sweep[1.0].psnr != codec_row.psnr
    names = {p.name for p in written}
    assert {"results.parquet", "summary.md", "corrdiff_psnr_vs_p.png", "corrdiff_hf_vs_p.png"} <= names
    assert pq.read_table(tmp_path / "out" / "results.parquet").num_rows == 4
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| 0 | corrdiff | 0.5 |" in summary and "lpips_alex_v0.1.pth" in summary
    assert all(0.0 <= r.gmsd < 0.5 and 0.0 < r.haarpsi <= 1.0 for r in rows)
    assert sweep[0.0].gmsd == codec_row.gmsd and sweep[0.0].haarpsi == codec_row.haarpsi


def test_perceptual_weights_are_looked_up_and_missing_ones_named(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(METRIC_WEIGHTS_ENV, str(tmp_path))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    (tmp_path / "pt_inception-2015-12-05-6726825d.pth").write_bytes(b"x")
    statuses = {s.metric: s for s in perceptual_weights()}
    assert statuses["FID (Inception, patches)"].missing == ()
    assert statuses["LPIPS (AlexNet)"].missing == ("alexnet-owt-7be5be79.pth", "lpips_alex_v0.1.pth")
    message = perceptual_message(list(statuses.values()))
    assert "DISTS needs vgg16-397923af.pth + DISTS_weights.pt" in message
    assert str(tmp_path) in message and str(tmp_path / "hub" / "checkpoints") in message
    assert "Weights found for FID" in message
