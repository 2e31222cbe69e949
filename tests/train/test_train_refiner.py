"""``ncpipe train refiner``: the decoder's x̂ as training input, aligned crops, loss going down, resume, CLI."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest
import torch

from ncpipe.codec import LearnedCodec
from ncpipe.diffusion.commands import register_train, train_refiner_config
from ncpipe.diffusion.refiner import Refiner, TrainedCodec, load_refiner
from ncpipe.train.loop import load_state
from ncpipe.train.refiner_trainer import (
    XHAT_SOURCE,
    AlignedCrops,
    RefinerTrainConfig,
    decode_training_images,
    decoded_training_set,
    refiner_loss,
    train_refiner,
)
from tests.factories import BSDS, kodak_pixels

TRAIN_IMAGES = tuple(str(p) for p in sorted((BSDS / "val").glob("*.jpg"))[:2])
TINY = dict(base_channels=8, channel_mults=(1, 2), time_embed_dim=32, crop=32, batch_size=2, lr=1e-3,
            warmup_steps=1, log_every=1, device="cpu", threads=1)




def test_training_pairs_are_what_the_decoder_reconstructs(codec: LearnedCodec) -> None:
    pixels = kodak_pixels(4, (80, 96))
    (item,) = decode_training_images(codec, [pixels])
    data = codec.encode_batch([pixels], ["RGB"])[0]
    header, symbols = codec.decode_symbols(data)
    (x_hat,) = codec.synthesise([header], [symbols])
    assert torch.equal(item.x_hat, x_hat) and torch.equal(item.x.permute(1, 2, 0), torch.from_numpy(pixels))
    _, means = codec.entropy_parameters(torch.from_numpy(symbols.z)[None])
    assert torch.equal(item.y_hat, (torch.from_numpy(symbols.y).double() + means[0]).float())
    assert item.rate == codec.model.identity.rate


def test_crops_are_aligned_with_their_latents(codec: LearnedCodec) -> None:
    pool = decode_training_images(codec, [kodak_pixels(5, (96, 128))])
    x0, x_hat, y_hat, rates = AlignedCrops([pool], 32, seed=0).batch(6)
    assert x0.shape == x_hat.shape == (6, 3, 32, 32) and y_hat.shape == (6, 24, 2, 2)
    source = pool[0]
    for i in range(6):  # find each crop in its image: it must sit on the 16-pixel grid with its ŷ
        hits = [(t, c) for t in range(0, 96 - 31, 16) for c in range(0, 128 - 31, 16)
                if torch.equal(source.x_hat[:, t : t + 32, c : c + 32], x_hat[i])]
        assert len(hits) == 1
        t, c = hits[0]
        assert torch.equal(y_hat[i], source.y_hat[:, t // 16 : t // 16 + 2, c // 16 : c // 16 + 2])
        assert torch.equal(x0[i], source.x[:, t : t + 32, c : c + 32].float() / 255)
    assert torch.equal(rates, torch.full((6,), codec.model.identity.rate))


@pytest.mark.parametrize("options", [{}, {"affm": False}, {"process": "gaussian"},
                                     {"latent_features": 2, "rate_conditioning": True}])
def test_a_tiny_refiner_learns(codec: LearnedCodec, options: dict) -> None:
    """Adam on one fixed batch (same t draws every step): the loss must fall well below its start."""
    config = RefinerTrainConfig(codecs=("unused",), data=(), run_dir="unused", **{**TINY, **options})
    identity = codec.model.identity
    torch.manual_seed(0)
    refiner = Refiner(config.refiner_config(24), [TrainedCodec(identity.sha256, identity.arch, identity.rate)]).train()
    pool = decode_training_images(codec, [kodak_pixels(7, (64, 96))])
    batch = AlignedCrops([pool], 32, seed=0).batch(4)
    optimizer = torch.optim.Adam(refiner.parameters(), lr=2e-3)
    losses = []
    for _ in range(25):
        loss, identity = refiner_loss(refiner, *batch, torch.Generator().manual_seed(1), config.loss)
        if not losses and refiner.config.parameterization == "residual":
            assert torch.equal(loss, identity)  # the untrained residual refiner returns x_t
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_train_job_releases_a_bound_refiner_and_resumes(codec: LearnedCodec, tiny_model_path: Path,
                                                        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = RefinerTrainConfig(codecs=(str(tiny_model_path),), data=TRAIN_IMAGES, run_dir=str(tmp_path / "run"),
                                steps=3, checkpoint_every=2, cache_dir=str(tmp_path / "cache"), **TINY)
    path = train_refiner(config)
    refiner = load_refiner(path, codec_sha256=codec.model.identity.sha256)
    assert refiner.provenance["xhat_source"] == XHAT_SOURCE and refiner.provenance["steps"] == 3
    assert load_state(tmp_path / "run")["step"] == 3
    assert len(list((tmp_path / "cache").glob("decoded-*.pt"))) == 1
    caplog.set_level(logging.INFO)
    train_refiner(RefinerTrainConfig(**{**config.__dict__, "steps": 5}))
    assert "resuming" in caplog.text and "reading the decoded training set" in caplog.text
    assert load_state(tmp_path / "run")["step"] == 5
    assert load_refiner(path).sha256 != refiner.sha256
    with pytest.raises(ValueError, match="another configuration"):
        train_refiner(RefinerTrainConfig(**{**config.__dict__, "affm": False, "steps": 6}))


def test_cached_training_set_equals_a_fresh_decode(codec: LearnedCodec, tmp_path: Path) -> None:
    images = [kodak_pixels(8, (64, 80))]
    first = decoded_training_set(codec, images, str(tmp_path))
    again = decoded_training_set(codec, images, str(tmp_path))
    other = decoded_training_set(codec, [kodak_pixels(9, (64, 80))], str(tmp_path))
    assert all(torch.equal(getattr(first[0], f), getattr(again[0], f)) for f in ("x", "x_hat", "y_hat"))
    assert len(list(tmp_path.glob("decoded-*.pt"))) == 2 and not torch.equal(other[0].x, first[0].x)


def test_command_line_builds_the_config() -> None:
    parser = argparse.ArgumentParser()
    register_train(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["refiner", "--codec", "a", "--codec", "b", "--data", "imgs", "--run-dir", "r",
                              "--baseline", "gaussian", "--no-affm", "--channel-mults", "1,2", "--crop", "64",
                              "--latent-features", "4", "--rate-conditioning", "--no-amp"])
    config = train_refiner_config(args)
    assert config.codecs == ("a", "b") and config.process == "gaussian" and not config.affm and not config.amp
    assert config.channel_mults == (1, 2) and config.latent_features == 4 and config.rate_conditioning
    refiner_config = config.refiner_config(128)
    assert refiner_config.parameterization == "x0" and refiner_config.unet.cond_channels == 7
    with pytest.raises(ValueError, match="multiple"):
        RefinerTrainConfig(codecs=("a",), data=(), run_dir="r", crop=40)


def test_config_rejects_mixed_architectures(tmp_path: Path, tiny_model_path: Path) -> None:
    with pytest.raises(ValueError, match="the same codec was named twice"):
        train_refiner(RefinerTrainConfig(codecs=(str(tiny_model_path),) * 2, data=TRAIN_IMAGES,
                                         run_dir=str(tmp_path), steps=1, **TINY))


def test_rates_of_several_codecs_are_mixed(codec: LearnedCodec) -> None:
    pool_a = decode_training_images(codec, [kodak_pixels(1, (64, 64))])
    pool_b = [type(pool_a[0])(x=pool_a[0].x, x_hat=pool_a[0].x_hat, y_hat=pool_a[0].y_hat, rate=0.05)]
    rates = AlignedCrops([pool_a, pool_b], 32, seed=0).batch(40)[3]
    expected = torch.tensor([codec.model.identity.rate, 0.05], dtype=torch.float32)
    assert torch.equal(torch.unique(rates), expected.sort().values)
