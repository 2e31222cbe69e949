"""Registry: release round trip, SHA-256 checks, loading by name or path, CompressAI zoo import (no download)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ncpipe.cli import main
from ncpipe.codec import LearnedCodec
from ncpipe.config import DEFAULT_MODEL
from ncpipe.models.checkpoint import (
    CheckpointError,
    CodecModel,
    file_sha256,
    model_digest,
    read_checkpoint,
    release_checkpoint,
)
from ncpipe.models.registry import load_model, resolve_model
from ncpipe.models.zoo import ZOO_MSE_LAMBDAS
from ncpipe.train.codec_trainer import adapter_from_state
from ncpipe.train.loop import load_state
from tests.factories import BSDS, kodak_pixels

TINY_TRAIN = ["--hparams", "N=16", "M=24", "--batch-size", "2", "--crop", "64", "--lr", "1e-3", "--device", "cpu",
              "--steps", "3", "--lambda", "0.01"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> dict[str, Path]:
    """A tiny run trained and released through the CLI into a temporary registry."""
    root = tmp_path_factory.mktemp("registry")
    images, crops = root / "images", root / "crops"
    images.mkdir()
    crops.mkdir()
    for path in sorted((BSDS / "val").glob("*.jpg"))[:2]:
        shutil.copy(path, images / path.name)
    for number in (5, 23):
        Image.fromarray(kodak_pixels(number, (64, 96))).save(crops / f"kodim{number:02d}.png")
    run, models = root / "run", root / "models"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    assert main(["train", "codec", "--data", str(images), "--run-dir", str(run), *TINY_TRAIN]) == 0
    assert main(["train", "release", str(run), "--name", "tiny", "--eval-images", str(crops),
                 "--models-dir", str(models), "--hardware", "test CPU"]) == 0
    torch.set_num_threads(threads)
    return {"run": run, "models": models, "folder": models / "tiny", "crops": crops}


@pytest.fixture
def registry(released, monkeypatch) -> Path:
    monkeypatch.setenv("NCPIPE_MODEL_DIRS", str(released["models"]))
    return released["models"]


def test_release_writes_checkpoint_and_measured_card(released):
    folder = released["folder"]
    card = json.loads((folder / "card.json").read_text())
    assert card["sha256"] == model_digest(read_checkpoint(folder / "model.pt"))
    assert card["file_sha256"] == file_sha256(folder / "model.pt")
    assert card["hparams"] == {"N": 16, "M": 24} and card["training"]["steps"] == 3
    assert card["training"]["hardware"] == "test CPU"
    (evaluation,) = card["evaluations"]
    assert evaluation["dataset"] == "crops (2 images)" and evaluation["images"] == 2 and evaluation["bpp"] > 0
    assert evaluation["command"] == (
        f"ncpipe train release {released['run']} --name tiny --eval-images {released['crops']} "
        f"--models-dir {released['models']} --hardware 'test CPU'"
    )
    assert card["sha256"] in (folder / "README.md").read_text()


def test_round_trip_gives_identical_digest_and_bitstreams(released, registry):
    state = load_state(released["run"])
    in_memory = release_checkpoint(adapter_from_state(state), state["lambdas"], {})
    original = CodecModel(in_memory, model_digest(in_memory))
    loaded = load_model("tiny")
    assert loaded.identity == original.identity
    image = kodak_pixels(7, (80, 112))
    codecs = [LearnedCodec(original, coder_threads=1), LearnedCodec(loaded, coder_threads=1)]
    try:
        (before,), (after,) = (codec.encode_batch([image], ["RGB"]) for codec in codecs)
        assert before == after
        np.testing.assert_array_equal(codecs[0].decode(after)[1], codecs[1].decode(before)[1])
    finally:
        for codec in codecs:
            codec.close()


def test_a_changed_card_or_checkpoint_is_refused_naming_both_digests(released, tmp_path, monkeypatch):
    models = tmp_path / "models"
    shutil.copytree(released["folder"], models / "tiny")
    monkeypatch.setenv("NCPIPE_MODEL_DIRS", str(models))
    card_path = models / "tiny" / "card.json"
    card = json.loads(card_path.read_text())
    true_digest, claimed = card["sha256"], "ab" * 32
    card_path.write_text(json.dumps({**card, "sha256": claimed}))
    with pytest.raises(CheckpointError) as refused:
        load_model("tiny")
    assert true_digest in str(refused.value) and claimed in str(refused.value)

    card_path.write_text(json.dumps(card))
    checkpoint = torch.load(models / "tiny" / "model.pt", weights_only=True)
    checkpoint["state_dict"]["g_s.0.weight"] += 1e-3
    torch.save(checkpoint, models / "tiny" / "model.pt")
    with pytest.raises(CheckpointError, match=f"has model SHA-256 [0-9a-f]{{64}}, but {true_digest} was expected"):
        load_model("tiny")


def test_load_by_name_folder_or_file(released, registry):
    folder = released["folder"]
    by_name, by_folder, by_file = (load_model(ref) for ref in ("tiny", str(folder), str(folder / "model.pt")))
    assert by_name.identity.sha256 == by_folder.identity.sha256 == by_file.identity.sha256
    assert resolve_model("tiny").expected_sha256 == by_name.identity.sha256
    assert resolve_model(str(folder / "model.pt")).expected_sha256 is None  # a bare file has no card to check
    with pytest.raises(CheckpointError, match="no model named or at 'nope'.*tiny"):
        load_model("nope")


def test_release_refuses_to_replace_a_registry_model(released, caplog):
    assert main(["train", "release", str(released["run"]), "--name", "tiny", "--eval-images", str(released["crops"]),
                 "--models-dir", str(released["models"])]) == 2
    assert "exists" in caplog.text and "--overwrite" in caplog.text


# -- CompressAI zoo weights -----------------------------------------------------------------


def _legacy_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Key names of early CompressAI releases: ``entropy_bottleneck._biases.0`` for today's ``biases.0``."""
    renamed = {}
    for key, value in state_dict.items():
        for name in ("biases", "matrices", "factors"):
            key = key.replace(f"entropy_bottleneck.{name}.", f"entropy_bottleneck._{name}.")
        renamed[key] = value
    assert renamed.keys() != state_dict.keys()
    return renamed


def _fake_zoo_file(directory: Path, quality: int, legacy: bool = False, wrong_hash: bool = False) -> tuple[Path, dict]:
    """A randomly initialised CompressAI mbt2018-mean (zoo size for ``quality``) under CompressAI's file name."""
    from compressai.models import MeanScaleHyperprior

    torch.manual_seed(quality)
    state_dict = MeanScaleHyperprior(128, 192).state_dict()
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / "weights.partial"
    torch.save(_legacy_keys(state_dict) if legacy else state_dict, partial)
    digest = hashlib.sha256(partial.read_bytes()).hexdigest()
    prefix = ("0" if digest[0] != "0" else "1") + digest[1:8] if wrong_hash else digest[:8]
    path = directory / f"mbt2018-mean-{quality}-{prefix}.pth.tar"
    partial.rename(path)
    return path, state_dict


@pytest.mark.parametrize("legacy", [False, True], ids=["current-keys", "legacy-keys"])
def test_zoo_import_from_the_hub_cache_codes_images(tmp_path, monkeypatch, legacy):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path, state_dict = _fake_zoo_file(tmp_path / "torch" / "hub" / "checkpoints", 3, legacy)
    models = tmp_path / "models"
    assert main(["train", "import-zoo", "mbt2018-mean", "--quality", "3", "--name", "zoo-q3",
                 "--models-dir", str(models)]) == 0
    card = json.loads((models / "zoo-q3" / "card.json").read_text())
    assert card["source"]["file"] == str(path) and card["source"]["file_sha256"] == file_sha256(path)
    assert card["source"]["compressai_release"] is False  # random weights: not the published file
    assert card["rate"]["lambda"] == pytest.approx(ZOO_MSE_LAMBDAS[3]) and card["hparams"] == {"N": 128, "M": 192}
    assert str(path) in (models / "zoo-q3" / "README.md").read_text()

    monkeypatch.setenv("NCPIPE_MODEL_DIRS", str(models))
    model = load_model("zoo-q3")
    torch.testing.assert_close(model.adapter.model.g_a[0].weight, state_dict["g_a.0.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.adapter.model.entropy_bottleneck.matrices[0],
                               state_dict["entropy_bottleneck.matrices.0"], rtol=0, atol=0)
    codec = LearnedCodec(model, coder_threads=1)
    try:
        image = kodak_pixels(15, (64, 96))
        batch = codec.analyse([image])
        data = codec.submit_entropy_coding(batch, 0, "RGB").result()
        header, symbols = codec.decode_symbols(data)
        np.testing.assert_array_equal(symbols.y, batch.y_symbols[0])
        assert codec.decode(data)[1].shape == image.shape and header.model_sha256 == card["sha256"]
    finally:
        codec.close()


def test_zoo_import_refuses_a_file_whose_hash_does_not_match_its_name(tmp_path, monkeypatch, caplog):
    path, _ = _fake_zoo_file(tmp_path / "weights", 3, wrong_hash=True)
    assert main(["train", "import-zoo", "mbt2018-mean", "--quality", "3", "--file", str(path), "--name", "z",
                 "--models-dir", str(tmp_path / "models")]) == 2
    assert "damaged or not the one published" in caplog.text and file_sha256(path) in caplog.text
    assert not (tmp_path / "models" / "z").exists()


def test_zoo_import_checks_quality_and_sizes(tmp_path, caplog):
    path, _ = _fake_zoo_file(tmp_path / "weights", 5)  # N, M = 128, 192, but quality 5 is 192, 320
    args = ["train", "import-zoo", "mbt2018-mean", "--file", str(path), "--name", "z", "--models-dir", str(tmp_path)]
    assert main([*args, "--quality", "3"]) == 2
    assert "is CompressAI's mbt2018-mean quality 5, not mbt2018-mean quality 3" in caplog.text
    assert main([*args, "--quality", "5"]) == 2
    assert "has N, M = (128, 192), but CompressAI's mbt2018-mean quality 5 has (192, 320)" in caplog.text


def test_zoo_import_never_downloads_and_names_where_it_looked(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    assert main(["train", "import-zoo", "mbt2018-mean", "--quality", "2", "--name", "z",
                 "--models-dir", str(tmp_path / "models")]) == 2
    expected_dir = tmp_path / "empty" / "hub" / "checkpoints"
    assert f"no CompressAI zoo file mbt2018-mean-2-*.pth.tar in {expected_dir}" in caplog.text
    assert "never downloads" in caplog.text


def test_the_default_model_is_the_shipped_variable_rate_codec(monkeypatch):
    """The README demo's default is a shipped variable-rate codec whose card holds a Kodak measurement of
    every quality level, with bits and PSNR rising with the level (the knob does what it says)."""
    monkeypatch.delenv("NCPIPE_MODEL_DIRS", raising=False)
    ref = resolve_model(DEFAULT_MODEL)
    levels = ref.card["quality"]["lambdas"]
    (kodak,) = [e for e in ref.card["evaluations"] if e["dataset"] == "kodak (24 images)"]
    measured = kodak["qualities"]
    assert [q["quality"] for q in measured] == list(range(1, len(levels) + 1)) and len(levels) >= 6
    for low, high in zip(measured, measured[1:]):
        assert low["bpp"] < high["bpp"] and low["psnr"] < high["psnr"]
    assert kodak["default_quality"] == ref.card["quality"]["default"]

def test_an_empty_registry_says_where_models_come_from(monkeypatch, caplog, capsys):
    from ncpipe.models import registry

    monkeypatch.delenv("NCPIPE_MODEL_DIRS", raising=False)
    monkeypatch.delenv("NCPIPE_MODEL_STORE", raising=False)
    monkeypatch.setattr(registry, "shipped_models_dir", lambda: None)
    assert main(["models"]) == 0
    assert capsys.readouterr().out == ""
    assert "no models found" in caplog.text
    assert "NCPIPE_MODEL_DIRS" in caplog.text and "NCPIPE_MODEL_STORE" in caplog.text
