"""``ncpipe train refiner``: the decoder's x̂ as training input, aligned crops, loss going down, resume, CLI."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest
import torch

from ncpipe.cli.refiner import register_train, train_refiner_config
from ncpipe.codec import LearnedCodec
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


def test_ema_warms_up_and_averages() -> None:
    from ncpipe.train.ema import EmaWeights

    net = torch.nn.Linear(2, 1)
    ema = EmaWeights(net, decay=0.9)
    start = net.weight.detach().clone()
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0): the first update mostly copies
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    assert torch.allclose(ema.shadow["weight"], start + 0.9)
    averaged = ema.averaged(net)
    assert torch.allclose(averaged.weight, start + 0.9) and torch.equal(net.weight, start + 1.0)
    restored = EmaWeights(net, decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 1 and torch.equal(restored.shadow["weight"], ema.shadow["weight"])


def test_unet_presets_and_the_base_size() -> None:
    """The named base size is a 3-10 M parameter refiner (with ŷ and log λ conditioning of a 128-channel codec)."""
    import dataclasses

    from ncpipe.diffusion.presets import UNET_PRESETS

    base = RefinerTrainConfig(codecs=("a",), data=(), run_dir="r", latent_features=8, rate_conditioning=True,
                              **dataclasses.asdict(UNET_PRESETS["base"]))
    refiner = Refiner(base.refiner_config(128))
    assert 3_000_000 <= sum(p.numel() for p in refiner.parameters()) <= 10_000_000
    assert sum(1 for m in refiner.modules() if type(m).__name__ == "AFFM") == 3


def test_windows_release_the_best_ema_weights_and_continue(tiny_vbr_model_path: Path, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """Every quality of a variable-rate codec; a window ends at max_minutes with the state saved and the
    best EMA weights released; the same run_dir resumes; a new run starts from the released weights."""
    from tests.conftest import TINY_VBR_LAMBDAS

    caplog.set_level(logging.INFO)
    config = RefinerTrainConfig(codecs=(str(tiny_vbr_model_path),), data=TRAIN_IMAGES, run_dir=str(tmp_path / "a"),
                                steps=50, checkpoint_every=100, max_minutes=1e-6, rate_conditioning=True,
                                validation_crops=2, **TINY)
    path = train_refiner(config)
    state = load_state(tmp_path / "a")
    assert state["step"] == 1 and "max_minutes" in caplog.text  # the window ended after its first step
    released = load_refiner(path)
    assert released.provenance["weights"] == "EMA" and released.provenance["released_at_step"] == 1
    assert released.provenance["rates"] == pytest.approx(sorted(TINY_VBR_LAMBDAS), rel=1e-6)
    assert released.provenance["validation_loss"] == pytest.approx(state["best_validation"])
    ema = {k: v for k, v in state["ema"]["shadow"].items()}
    assert all(torch.equal(released.state_dict()[k], ema[k]) for k in ema)  # EMA weights, not the raw ones
    assert not all(torch.equal(state["model"][k], ema[k]) for k in ema)

    train_refiner(RefinerTrainConfig(**{**config.__dict__, "max_minutes": None, "steps": 3}))
    assert load_state(tmp_path / "a")["step"] == 3

    follow = RefinerTrainConfig(**{**config.__dict__, "run_dir": str(tmp_path / "b"), "init_from": str(path),
                                   "steps": 1, "lr": 1e-12, "warmup_steps": 0})
    (tmp_path / "b").mkdir()
    continued = load_refiner(train_refiner(follow))
    start = load_refiner(path)
    assert "initialised from" in caplog.text
    assert all(torch.allclose(continued.state_dict()[k], v, atol=1e-6) for k, v in start.state_dict().items())


def test_init_from_refuses_another_size(tmp_path: Path, tiny_model_path: Path) -> None:
    from ncpipe.config import ConfigError
    from ncpipe.train.refiner_trainer import load_initial_weights

    other = Refiner(RefinerTrainConfig(codecs=("a",), data=(), run_dir="r", base_channels=16).refiner_config(24))
    torch.save({"format": "x", "state_dict": other.state_dict()}, tmp_path / "other.pt")
    mine = Refiner(RefinerTrainConfig(codecs=("a",), data=(), run_dir="r", **TINY).refiner_config(24))
    with pytest.raises(ConfigError, match="another network"):
        load_initial_weights(mine, str(tmp_path / "other.pt"))


def test_command_line_presets_windows_and_qualities() -> None:
    parser = argparse.ArgumentParser()
    register_train(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["refiner", "--codec", "a", "--data", "imgs", "--run-dir", "r", "--preset", "base",
                              "--blocks-per-level", "1", "--max-minutes", "30", "--init-from", "x.pt",
                              "--qualities", "1,8", "--crop", "256", "--ema-decay", "0.99"])
    config = train_refiner_config(args)
    assert (config.base_channels, config.channel_mults, config.blocks_per_level) == (48, (1, 2, 4, 4), 1)
    assert config.max_minutes == 30 and config.init_from == "x.pt" and config.qualities == (1, 8)
    assert config.train_levels == "continuous" and config.ema_decay == 0.99
    assert config.refiner_config(128).train_levels == "continuous"


def test_the_gpu_job_spec_builds_the_base_refiner_and_flags_override_it() -> None:
    parser = argparse.ArgumentParser()
    register_train(parser.add_subparsers(dest="cmd"))
    spec = str(Path(__file__).parents[2] / "jobs" / "train-refiner.yaml")
    args = parser.parse_args(["refiner", "--spec", spec, "--data", "photos", "--no-affm", "--run-dir", "r2"])
    config = train_refiner_config(args)
    assert config.codecs == ("mbt2018-mean-vbr-small",) and config.data == ("photos",) and config.run_dir == "r2"
    assert config.crop == 256 and config.train_levels == "continuous" and config.ema_decay == 0.999
    assert not config.affm and config.max_minutes == 8 and config.part_mib == 15  # the flag wins over the spec
    assert (config.base_channels, config.channel_mults, config.blocks_per_level) == (48, (1, 2, 4, 4), 2)
    refiner = Refiner(config.refiner_config(128))
    assert 3_000_000 <= sum(p.numel() for p in refiner.parameters()) <= 10_000_000
    with pytest.raises(ValueError, match="--data"):
        train_refiner_config(parser.parse_args(["refiner", "--spec", spec]))
