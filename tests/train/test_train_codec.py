"""`ncpipe train codec`: a tiny model learns on CPU, resumes where it stopped, reads shards and spec files."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ncpipe.cli import build_parser, main
from ncpipe.cli.train import TRAIN_CODEC_FLAGS, train_codec_config
from ncpipe.config import ConfigError
from ncpipe.images import decode_image
from ncpipe.operations.jobspec import spec_fields
from ncpipe.train import codec_trainer
from ncpipe.train.codec_trainer import CodecTrainConfig, train_codec
from ncpipe.train.data import load_training_images, training_sources
from ncpipe.train.loop import load_state
from tests.factories import BSDS, REPO_ROOT, TINY_HPARAMS
from tests.helpers import tar_bytes

TINY_FLAGS = ["--hparams", "N=16", "M=24", "--batch-size", "2", "--crop", "64", "--lr", "1e-3", "--device", "cpu"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bsds_files() -> list[Path]:
    files = sorted((BSDS / "val").glob("*.jpg"))[:4]
    if len(files) < 4:
        pytest.skip(f"BSDS500 images not found at {BSDS}")
    return files


@pytest.fixture
def image_dir(tmp_path, bsds_files) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for path in bsds_files[:2]:
        shutil.copy(path, folder / path.name)
    return folder


def _write_spec(path: Path, kind: str, spec: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"kind": kind, "spec": spec}))
    return path


def test_every_config_field_has_a_flag(capsys):
    fields = [f.name for f in dataclasses.fields(CodecTrainConfig)]
    assert list(TRAIN_CODEC_FLAGS) == fields
    with pytest.raises(SystemExit):
        main(["train", "codec", "--help"])
    help_text = capsys.readouterr().out
    missing = [name for name in fields if f"--{name.replace('_', '-')}" not in help_text]
    assert not missing, f"no flag for {missing}"


class _RecordingProgress(codec_trainer.StepMeans):
    losses: list[float] = []

    def add(self, step: int, **values: float) -> None:
        type(self).losses.append(values["loss"])
        super().add(step, **values)


def test_tiny_model_loss_decreases_on_cpu(image_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(codec_trainer, "StepMeans", _RecordingProgress)
    _RecordingProgress.losses = []
    config = CodecTrainConfig(
        data=(str(image_dir),), run_dir=str(tmp_path / "run"), hparams=dict(TINY_HPARAMS), lambdas=(0.01,), steps=24,
        batch_size=2, crop=64, lr=1e-3, checkpoint_every=24, log_every=100, device="cpu", seed=0,
    )
    train_codec(config)
    losses = _RecordingProgress.losses
    assert len(losses) == 24 and all(np.isfinite(losses))
    first, last = statistics.fmean(losses[:4]), statistics.fmean(losses[-4:])
    assert last < 0.8 * first, f"loss did not fall: first steps {losses[:4]}, last steps {losses[-4:]}"
    assert load_state(Path(config.run_dir))["step"] == 24


def test_resume_continues_from_the_saved_step(image_dir, tmp_path, monkeypatch):
    spec = _write_spec(tmp_path / "spec.yaml", "train-codec", {
        "data": [str(image_dir)], "run_dir": str(tmp_path / "run"), "lambdas": [0.01], "checkpoint_every": 2,
    })
    assert main(["train", "codec", "--spec", str(spec), *TINY_FLAGS, "--steps", "4"]) == 0
    assert load_state(tmp_path / "run")["step"] == 4

    batches = []

    class CountingCrops(codec_trainer.RandomCrops):
        def batch(self, size):
            batches.append(size)
            return super().batch(size)

    monkeypatch.setattr(codec_trainer, "RandomCrops", CountingCrops)
    assert main(["train", "codec", "--spec", str(spec), *TINY_FLAGS, "--steps", "6"]) == 0
    state = load_state(tmp_path / "run")
    assert state["step"] == 6
    assert len(batches) == 2  # only steps 4 and 5 ran
    adam_steps = {int(s["step"]) for s in state["optimizer"]["state"].values()}
    assert adam_steps == {6}  # the optimizer state was restored, not restarted


def test_resume_refuses_a_run_dir_of_another_model(image_dir, tmp_path, caplog):
    args = ["train", "codec", "--data", str(image_dir), "--run-dir", str(tmp_path / "run"), *TINY_FLAGS]
    assert main([*args, "--steps", "1", "--lambda", "0.01"]) == 0
    assert main([*args, "--steps", "2", "--lambda", "0.05"]) == 2
    assert "holds a run of" in caplog.text and "0.05" in caplog.text
    assert load_state(tmp_path / "run")["step"] == 1


def test_flags_override_the_spec_file(tmp_path):
    spec = _write_spec(tmp_path / "spec.yaml", "train-codec", {
        "data": "images", "run_dir": "runs/x", "hparams": {"N": 16, "M": 24}, "steps": 100, "amp": True,
    })
    args = build_parser().parse_args(
        ["train", "codec", "--spec", str(spec), "--steps", "7", "--hparams", "N=8", "--no-amp", "--lambda", "0.02"])
    config = train_codec_config(args)
    assert config.steps == 7 and config.hparams == {"N": 8, "M": 24} and config.amp is False
    assert config.lambdas == (0.02,) and config.data == ("images",) and config.run_dir == "runs/x"
    assert config.batch_size == CodecTrainConfig.batch_size  # neither given: the dataclass default


def test_spec_errors_name_the_problem(tmp_path):
    wrong_kind = _write_spec(tmp_path / "eval.yaml", "evaluate", {"images": "x"})
    with pytest.raises(ConfigError, match="kind is 'evaluate', but this command runs kind 'train-codec'"):
        spec_fields(wrong_kind, "train-codec")
    typo = _write_spec(tmp_path / "typo.yaml", "train-codec", {"data": "x", "run_dir": "r", "stpes": 3})
    args = build_parser().parse_args(["train", "codec", "--spec", str(typo)])
    with pytest.raises(ConfigError, match=r"stpes: unknown field \(did you mean 'steps'\?\)"):
        train_codec_config(args)
    missing = _write_spec(tmp_path / "missing.yaml", "train-codec", {"data": "x"})
    with pytest.raises(ConfigError, match="missing required field.*run_dir"):
        train_codec_config(build_parser().parse_args(["train", "codec", "--spec", str(missing)]))
    with pytest.raises(ConfigError, match="steps: must be positive"):
        train_codec_config(build_parser().parse_args(["train", "codec", "--spec", str(missing), "--run-dir", "r",
                                                      "--steps", "0"]))


def test_the_shipped_job_spec_is_a_valid_config_once_given_data():
    spec = str(REPO_ROOT / "jobs" / "train-codec.yaml")
    with pytest.raises(ConfigError, match="data"):
        train_codec_config(build_parser().parse_args(["train", "codec", "--spec", spec]))
    config = train_codec_config(build_parser().parse_args(["train", "codec", "--spec", spec, "--data", "photos"]))
    assert config.arch == "mbt2018-mean" and config.lambdas == codec_trainer.QUALITY_LAMBDAS
    assert config.data == ("photos",) and config.max_minutes is not None


# -- WebDataset shards as training data ---------------------------------------------------


@pytest.fixture
def shard_dir(tmp_path, bsds_files) -> Path:
    """Two shards: 3 good images, a caption member, and one image member that cannot be decoded."""
    folder = tmp_path / "shards"
    folder.mkdir()
    members = [[(f"{p.stem}.jpg", p.read_bytes()), (f"{p.stem}.txt", b"a caption")] for p in bsds_files[:3]]
    (folder / "train-0.tar").write_bytes(tar_bytes([*members[0], *members[1]]))
    (folder / "train-1.tar").write_bytes(tar_bytes([*members[2], ("broken.png", b"not a png")]))
    return folder


def test_shard_patterns_load_like_folders(shard_dir, bsds_files):
    expected = [decode_image(p.read_bytes(), "jpg").pixels for p in bsds_files[:3]]
    for entry in (f"{shard_dir}/train-{{0..1}}.tar", str(shard_dir), f"file://{shard_dir}/train-*.tar"):
        images = load_training_images([entry], min_side=64)
        assert len(images) == 3, entry
        for got, want in zip(images, expected):
            np.testing.assert_array_equal(got, want)
    assert [s.kind for s in training_sources([f"{shard_dir}/train-0.tar"])] == ["shard"]


def test_shards_and_folders_mix_and_missing_ones_are_named(shard_dir, image_dir):
    images = load_training_images([str(image_dir), f"{shard_dir}/train-1.tar"], min_side=64)
    assert len(images) == 2 + 1
    with pytest.raises(ValueError, match=r"train-2.tar does not exist \(6 missing\)"):
        load_training_images([f"{shard_dir}/train-{{0..7}}.tar"], min_side=64)
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        load_training_images([str(image_dir.parent / "no-such-folder")], min_side=64)


def test_training_on_shards_through_the_cli(shard_dir, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "codec", "--data", f"{shard_dir}/train-{{0..1}}.tar", "--run-dir", str(run),
                 *TINY_FLAGS, "--steps", "2"]) == 0
    assert load_state(run)["step"] == 2


def test_images_smaller_than_the_crop_are_skipped(tmp_path, caplog):
    folder = tmp_path / "small"
    folder.mkdir()
    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(folder / "small.png")
    with caplog.at_level(logging.INFO), pytest.raises(ValueError, match=">= 64 px"):
        load_training_images([str(folder)], min_side=64)
    assert "1 smaller than 64 px skipped" in caplog.text


# -- variable rate, training windows, resuming from released weights -----------------------------


def test_tiny_variable_rate_model_loss_decreases(image_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(codec_trainer, "StepMeans", _RecordingProgress)
    _RecordingProgress.losses = []
    config = CodecTrainConfig(
        data=(str(image_dir),), run_dir=str(tmp_path / "run"), hparams=dict(TINY_HPARAMS),
        lambdas=(0.004, 0.016, 0.064), steps=24, batch_size=3, crop=64, lr=1e-3, checkpoint_every=24,
        log_every=100, device="cpu", seed=0,
    )
    train_codec(config)
    losses = _RecordingProgress.losses
    first, last = statistics.fmean(losses[:4]), statistics.fmean(losses[-4:])
    assert last < 0.8 * first, f"loss did not fall: first steps {losses[:4]}, last steps {losses[-4:]}"
    state = load_state(Path(config.run_dir))
    assert state["lambdas"] == [0.004, 0.016, 0.064] and state["quality_log_steps"].shape == (3, 24)
    assert not torch.equal(state["quality_log_steps"][:, 0], torch.tensor([0.5, -0.193, -0.886]))  # steps learn


def test_max_minutes_ends_a_window_with_the_state_saved(image_dir, tmp_path):
    config = CodecTrainConfig(
        data=(str(image_dir),), run_dir=str(tmp_path / "run"), hparams=dict(TINY_HPARAMS), lambdas=(0.01, 0.04),
        steps=1000, batch_size=2, crop=64, checkpoint_every=1000, max_minutes=1e-6, device="cpu",
    )
    train_codec(config)
    assert load_state(tmp_path / "run")["step"] == 1  # one step, then out of time: saved, resumable


def test_a_state_written_in_parts_loads_and_resumes(image_dir, tmp_path):
    args = ["train", "codec", "--data", str(image_dir), "--run-dir", str(tmp_path / "run"), *TINY_FLAGS,
            "--lambda", "0.01", "0.04", "--part-mib", "1"]
    assert main([*args, "--steps", "2", "--hparams", "N=64", "M=96"]) == 0
    parts = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert "train_state.pt" not in parts and "train_state.parts.json" in parts
    assert len([p for p in parts if p.startswith("train_state.pt.")]) > 1  # > 1 MiB of state, in 1 MiB parts
    assert main([*args, "--steps", "3", "--hparams", "N=64", "M=96"]) == 0
    assert load_state(tmp_path / "run")["step"] == 3
    part = tmp_path / "run" / "train_state.pt.000"
    part.write_bytes(b"x" + part.read_bytes()[1:])
    with pytest.raises(ValueError, match="part 0 does not match"):
        load_state(tmp_path / "run")


def test_a_new_run_continues_from_a_released_variable_rate_model(tiny_vbr_model_path, image_dir, tmp_path):
    from ncpipe.models.checkpoint import HALF_PRECISION_PREFIXES, read_checkpoint
    from ncpipe.train.codec_trainer import initial_weights

    released = read_checkpoint(tiny_vbr_model_path)
    assert all(v.dtype == torch.float16 for k, v in released["state_dict"].items()
               if k.startswith(HALF_PRECISION_PREFIXES) and v.is_floating_point())
    config = CodecTrainConfig(
        data=(str(image_dir),), run_dir=str(tmp_path / "next"), hparams=dict(TINY_HPARAMS),
        lambdas=tuple(released["quality"]["lambdas"]), steps=1, batch_size=2, crop=64, lr=1e-12,
        checkpoint_every=1, init_from=str(tiny_vbr_model_path), device="cpu",
    )
    weights = initial_weights(config.init_from)
    train_codec(config)
    state = load_state(tmp_path / "next")
    torch.testing.assert_close(state["quality_log_steps"], released["quality_steps"].double().log().float())
    for name, tensor in weights.model.items():
        if name.startswith("g_s.") and name.endswith("weight"):
            torch.testing.assert_close(state["model"][name], tensor.float(), atol=1e-6, rtol=0)
    other = dataclasses.replace(config, run_dir=str(tmp_path / "other"), lambdas=(0.01, 0.02, 0.03))
    with pytest.raises(ConfigError, match="quality levels"):
        train_codec(other)


def test_ctrl_c_finishes_the_step_saves_and_stops(image_dir, tmp_path, monkeypatch):
    import os
    import signal

    class InterruptingCrops(codec_trainer.RandomCrops):
        calls = 0

        def batch(self, size):
            type(self).calls += 1
            if type(self).calls == 3:
                os.kill(os.getpid(), signal.SIGINT)  # as a user's Ctrl-C, in the middle of step 3
            return super().batch(size)

    monkeypatch.setattr(codec_trainer, "RandomCrops", InterruptingCrops)
    config = CodecTrainConfig(data=(str(image_dir),), run_dir=str(tmp_path / "run"), hparams=dict(TINY_HPARAMS),
                              lambdas=(0.01,), steps=50, batch_size=2, crop=64, checkpoint_every=50, device="cpu")
    train_codec(config)
    assert load_state(tmp_path / "run")["step"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is given back
