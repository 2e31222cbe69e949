"""The NC-Diffusion refiner on a real tiny codec: identity at init, determinism, codec binding, checkpoints."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from ncpipe.cli import main
from ncpipe.codec import LearnedCodec
from ncpipe.diffusion.refiner import (
    DecodedBatch,
    Refiner,
    RefinerConfig,
    RefinerError,
    RefinerMismatchError,
    TrainedCodec,
    decoded_batch,
    decoder_digest,
    load_refiner,
    read_refiner_checkpoint,
    save_refiner,
)
from ncpipe.models.checkpoint import CheckpointError
from ncpipe.models.registry import list_models, resolve_model
from tests.diffusion.conftest import SIZES, perturbed
from tests.diffusion.conftest import TINY as TINY_UNET
from tests.factories import kodak_pixels


def encode_decode(codec: LearnedCodec, images: list[np.ndarray]) -> DecodedBatch:
    """Real bitstreams, decoded as a decoder does, then the refiner's input."""
    data = codec.encode_batch(images, ["RGB"] * len(images))
    headers, symbols = zip(*(codec.decode_symbols(d) for d in data))
    return decoded_batch(codec, headers, symbols, codec.synthesise(headers, symbols))


@pytest.fixture
def batch(codec: LearnedCodec) -> DecodedBatch:
    """Function-scoped, so it is built under the one-thread setting of tests/diffusion/conftest.py."""
    return encode_decode(codec, [kodak_pixels(n, size) for n, size in zip((1, 2), SIZES)])


def trained_for(codec: LearnedCodec) -> list[TrainedCodec]:
    identity = codec.model.identity
    return [TrainedCodec(identity.sha256, identity.arch, identity.rate)]


def make_refiner(codec: LearnedCodec, perturb: bool = True, **options) -> Refiner:
    torch.manual_seed(0)
    config = RefinerConfig(unet=TINY_UNET, **options)
    refiner = Refiner(config, trained_for(codec))
    # 0.01: the output moves by ~0.05 on average, like a trained refiner's correction; larger random
    # weights saturate the image and amplify float reduction-order noise beyond what a real model has.
    return (perturbed(refiner, scale=0.01) if perturb else refiner).eval()


def single(batch: DecodedBatch, i: int) -> DecodedBatch:
    return DecodedBatch(
        x_hat=batch.x_hat[i : i + 1], y_hat=batch.y_hat[i : i + 1], sizes=batch.sizes[i : i + 1], padded=batch.padded,
        rates=batch.rates[i : i + 1], codec_sha256=batch.codec_sha256[i : i + 1], keys=batch.keys[i : i + 1],
    )


def test_decoded_batch_holds_the_decoders_latents(codec: LearnedCodec, batch: DecodedBatch) -> None:
    images = [kodak_pixels(n, size) for n, size in zip((1, 2), SIZES)]
    analysed = codec.analyse(images, reconstruct=True)
    z = torch.from_numpy(analysed.z_symbols)
    _, means = codec.entropy_parameters(z)
    expected = (torch.from_numpy(analysed.y_symbols).double() + means).float()
    assert torch.equal(batch.y_hat, expected)
    assert batch.sizes == SIZES and batch.padded == (64, 128)
    for x_hat, reconstruction in zip(batch.x_hat, analysed.reconstructions):
        assert torch.equal(x_hat, reconstruction)  # the decoder reconstructs what the encoder predicted
    assert len(set(batch.keys)) == 2 and batch.rates[0] == codec.model.identity.rate


@pytest.mark.parametrize("options", [{}, {"latent_features": 4, "latent_channels": 24, "rate_conditioning": True}])
@pytest.mark.parametrize("steps", [1, 4])
def test_untrained_residual_refiner_returns_x_hat_exactly(codec, batch, options, steps) -> None:
    refiner = make_refiner(codec, perturb=False, **options)
    out = refiner.refine(batch, steps)
    assert all(torch.equal(o, x) for o, x in zip(out, batch.x_hat))


def test_refine_changes_the_image_and_is_deterministic(codec, batch) -> None:
    refiner = make_refiner(codec, latent_features=4, latent_channels=24, rate_conditioning=True)
    first, again = refiner.refine(batch, 2), refiner.refine(batch, 2)
    for a, b, x_hat, size in zip(first, again, batch.x_hat, SIZES):
        assert a.shape == (3, *size) and torch.equal(a, b)
        assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0
        assert float((a - x_hat).abs().max()) > 1e-3


@pytest.mark.parametrize("options", [{}, {"kappa": 0.05}, {"process": "gaussian", "parameterization": "x0"}])
def test_batch_equals_single(codec, batch, options) -> None:
    refiner = make_refiner(codec, **options)
    together = refiner.refine(batch, 3)
    for i in range(2):
        (alone,) = refiner.refine(single(batch, i), 3)
        assert torch.allclose(together[i], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("options", [{"kappa": 0.05}, {"process": "gaussian", "parameterization": "x0"}])
def test_random_start_is_seeded_by_the_key(codec, batch, options) -> None:
    refiner = make_refiner(codec, **options)
    a = refiner.refine(batch, 2)
    assert all(torch.equal(x, y) for x, y in zip(a, refiner.refine(batch, 2)))
    other = refiner.refine(batch, 2, keys=["another key", batch.keys[1]])
    assert not torch.equal(a[0], other[0]) and torch.allclose(a[1], other[1], atol=1e-5)


def test_keys_default_to_the_bitstream_content(codec, batch) -> None:
    again = encode_decode(codec, [kodak_pixels(n, size) for n, size in zip((1, 2), SIZES)])
    assert again.keys == batch.keys
    other = encode_decode(codec, [kodak_pixels(3, SIZES[0])])
    assert other.keys[0] not in batch.keys


def test_refuses_a_codec_it_was_not_trained_for(codec, batch) -> None:
    refiner = Refiner(RefinerConfig(unet=TINY_UNET), [TrainedCodec("ab" * 32, "mbt2018-mean", 0.0067)])
    with pytest.raises(RefinerMismatchError, match="train one with `ncpipe train refiner"):
        refiner.refine(batch, 1)
    with pytest.raises(RefinerMismatchError, match=codec.model.identity.sha256):
        refiner.check_codec(codec.model.identity.sha256)


def test_checkpoint_round_trip(codec, batch, tmp_path: Path) -> None:
    refiner = make_refiner(codec, latent_features=4, latent_channels=24, rate_conditioning=True)
    sha = save_refiner(refiner, tmp_path / "r.pt", {"purpose": "test"})
    assert sha == refiner.sha256 == decoder_digest(read_refiner_checkpoint(tmp_path / "r.pt"))
    loaded = load_refiner(tmp_path / "r.pt", expected_sha256=sha, codec_sha256=codec.model.identity.sha256)
    assert loaded.config == refiner.config and loaded.codecs == refiner.codecs and loaded.sha256 == sha
    assert loaded.provenance == {"purpose": "test"} and not loaded.training
    assert all(torch.equal(a, b) for a, b in zip(loaded.refine(batch, 2), refiner.refine(batch, 2)))
    with pytest.raises(RefinerError, match="was expected"):
        load_refiner(tmp_path / "r.pt", expected_sha256="0" * 64)
    with pytest.raises(RefinerMismatchError):
        load_refiner(tmp_path / "r.pt", codec_sha256="cd" * 32)


def test_digest_covers_weights_config_and_codecs(codec, tmp_path: Path) -> None:
    refiner = make_refiner(codec)
    base = save_refiner(refiner, tmp_path / "a.pt", {})
    assert save_refiner(refiner, tmp_path / "b.pt", {"provenance": "is not hashed"}) == base
    with torch.no_grad():
        next(refiner.parameters()).view(-1)[0] += 1e-3
    assert save_refiner(refiner, tmp_path / "c.pt", {}) != base
    other = Refiner(dataclasses.replace(refiner.config, eta_min=0.1), refiner.codecs)
    other.load_state_dict(make_refiner(codec).state_dict())
    assert save_refiner(other, tmp_path / "d.pt", {}) != base


def test_rejects_files_that_are_not_refiners(tmp_path: Path, tiny_model_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no refiner named or at"):
        load_refiner(tmp_path / "missing.pt")
    with pytest.raises(RefinerError, match="not an ncpipe-refiner/1"):
        load_refiner(tiny_model_path)  # a codec checkpoint
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RefinerError, match="weights-only"):
        load_refiner(tmp_path / "junk.pt")


def test_a_released_refiner_loads_by_name_and_is_not_a_codec(codec, tmp_path, monkeypatch, caplog) -> None:
    refiner = make_refiner(codec)
    sha256 = save_refiner(refiner, tmp_path / "run" / "refiner.pt", {"steps": 3})
    models = tmp_path / "models"
    monkeypatch.setenv("NCPIPE_MODEL_DIRS", str(models))
    assert main(["train", "release-decoder", str(tmp_path / "run" / "refiner.pt"), "--name", "nc-tiny",
                 "--models-dir", str(models), "--summary", "a test refiner"]) == 0
    assert load_refiner("nc-tiny").sha256 == sha256
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert main(["train", "release-decoder", str(tmp_path / "junk.pt"), "--name", "junk",
                 "--models-dir", str(models)]) == 2  # a clear error, not a traceback
    assert "not a loadable weights-only checkpoint" in caplog.text
    assert "nc-tiny" in [ref.name for ref in list_models("refiner")]
    assert "nc-tiny" not in [ref.name for ref in list_models()]
    with pytest.raises(CheckpointError, match="'nc-tiny' is a refiner, not a codec"):
        resolve_model("nc-tiny")
    readme = (models / "nc-tiny" / "README.md").read_text()
    assert sha256 in readme and "a test refiner" in readme
    with torch.no_grad():
        next(refiner.parameters()).add_(1e-3)
    save_refiner(refiner, models / "nc-tiny" / "refiner.pt", {"steps": 3})  # other weights under the card
    with pytest.raises(RefinerError, match=f"but {sha256} was expected"):
        load_refiner("nc-tiny")


def test_config_round_trips_and_derives_the_conditioning_sizes() -> None:
    config = RefinerConfig(unet=TINY_UNET, latent_features=6, latent_channels=24, rate_conditioning=True)
    assert config.unet.cond_channels == 9 and config.unet.cond_vector_dim == 1
    assert RefinerConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="latent_channels"):
        RefinerConfig(latent_features=4)
    with pytest.raises(ValueError, match="kappa"):
        RefinerConfig(process="gaussian", kappa=0.1)
    assert torch.equal(config.etas(1), torch.tensor([0.0, 1.0], dtype=torch.float64))


def test_steps_and_batch_validation(codec, batch) -> None:
    refiner = make_refiner(codec)
    with pytest.raises(ValueError, match="steps"):
        refiner.refine(batch, 0)
    with pytest.raises(ValueError, match="keys"):
        refiner.refine(batch, 1, keys=["only one"])
    with pytest.raises(ValueError, match="one x̂"):
        dataclasses.replace(batch, keys=batch.keys[:1])
