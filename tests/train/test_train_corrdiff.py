"""``ncpipe train corrdiff``: the loss falls on a tiny decoder, the job releases a codec-bound decoder and
resumes, and the command line builds the config."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest
import torch

from ncpipe.cli.corrdiff import register_train, train_corrdiff_config
from ncpipe.codec import LearnedCodec
from ncpipe.diffusion.corrdiff import CorrDiffDecoder, CorrDiffMismatchError, load_corrdiff
from ncpipe.diffusion.refiner import TrainedCodec
from ncpipe.train.corrdiff_trainer import YHAT_SOURCE, CorrDiffTrainConfig, corrdiff_loss, train_corrdiff
from ncpipe.train.loop import load_state
from ncpipe.train.refiner_trainer import AlignedCrops, decode_training_images
from tests.factories import BSDS, kodak_pixels

TRAIN_IMAGES = tuple(str(p) for p in sorted((BSDS / "val").glob("*.jpg"))[:2])
TINY = dict(base_channels=8, channel_mults=(1, 2), time_embed_dim=32, latent_features=2, conditioner_hidden=8,
            crop=32, batch_size=2, lr=1e-3, warmup_steps=1, log_every=1, device="cpu", threads=1)




def test_a_tiny_decoder_learns(codec: LearnedCodec) -> None:
    """Adam on one fixed batch (same t and ε every step): the x0 loss must fall well below its start."""
    config = CorrDiffTrainConfig(codec="unused", data=(), run_dir="unused", **TINY)
    identity = codec.model.identity
    torch.manual_seed(0)
    decoder = CorrDiffDecoder(config.corrdiff_config(24), TrainedCodec(identity.sha256, identity.arch, identity.rate))
    x0, _, y_hat, _ = AlignedCrops([decode_training_images(codec, [kodak_pixels(7, (64, 96))])], 32, seed=0).batch(4)
    optimizer = torch.optim.Adam(decoder.train().parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = corrdiff_loss(decoder, x0, y_hat, torch.Generator().manual_seed(1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    # the conditioner is what lets the loss fall below the unconditional optimum: it gets gradients
    grad = decoder.conditioner.latent.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0


def test_train_job_releases_a_bound_decoder_and_resumes(codec: LearnedCodec, tiny_model_path: Path, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    config = CorrDiffTrainConfig(codec=str(tiny_model_path), data=TRAIN_IMAGES, run_dir=str(tmp_path / "run"), steps=3,
                                 checkpoint_every=2, cache_dir=str(tmp_path / "cache"), sample_steps=3,
                                 coefficient_bits=5, **TINY)
    path = train_corrdiff(config)
    decoder = load_corrdiff(path, codec_sha256=codec.model.identity.sha256)
    assert decoder.provenance["yhat_source"] == YHAT_SOURCE and decoder.provenance["steps"] == 3
    assert (decoder.config.steps, decoder.config.bits, decoder.config.latent_channels) == (3, 5, 24)
    assert load_state(tmp_path / "run")["step"] == 3
    with pytest.raises(CorrDiffMismatchError):
        load_corrdiff(path, codec_sha256="00" * 32)
    caplog.set_level(logging.INFO)
    train_corrdiff(CorrDiffTrainConfig(**{**config.__dict__, "steps": 5}))
    assert "resuming" in caplog.text and "reading the decoded training set" in caplog.text
    assert load_state(tmp_path / "run")["step"] == 5
    assert load_corrdiff(path).sha256 != decoder.sha256
    with pytest.raises(ValueError, match="another configuration"):
        train_corrdiff(CorrDiffTrainConfig(**{**config.__dict__, "latent_features": 3, "steps": 6}))


def test_command_line_builds_the_config() -> None:
    parser = argparse.ArgumentParser()
    register_train(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["corrdiff", "--codec", "a", "--data", "imgs", "--run-dir", "r", "--no-affm",
                              "--channel-mults", "1,2", "--crop", "64", "--latent-features", "4",
                              "--sample-steps", "6", "--coefficient-bits", "3", "--no-amp"])
    config = train_corrdiff_config(args)
    assert config.codec == "a" and config.data == ("imgs",) and not config.affm and not config.amp
    assert config.channel_mults == (1, 2) and config.latent_features == 4
    corrdiff = config.corrdiff_config(128)
    assert corrdiff.unet.cond_channels == 4 and corrdiff.unet.in_channels == 3
    assert (corrdiff.steps, corrdiff.bits) == (6, 3)
    with pytest.raises(ValueError, match="multiple"):
        CorrDiffTrainConfig(codec="a", data=(), run_dir="r", crop=40)


def test_a_multiscale_per_channel_decoder_trains_on_each_quality(tiny_vbr_model_path: Path, tmp_path: Path) -> None:
    """A variable-rate codec: one decoded pool per quality asked for, a multi-scale per-channel decoder released."""
    config = CorrDiffTrainConfig(codec=str(tiny_vbr_model_path), data=TRAIN_IMAGES, run_dir=str(tmp_path / "run"),
                                 steps=2, checkpoint_every=2, cache_dir=str(tmp_path / "cache"), qualities=(1, 3),
                                 multiscale=True, coefficient_groups=3, **TINY)
    decoder = load_corrdiff(train_corrdiff(config))
    assert len(list((tmp_path / "cache").glob("decoded-*.pt"))) == 2
    assert decoder.config.multiscale and decoder.config.coefficient_groups == 3
    assert decoder.provenance["weights"] == "EMA"
