"""`ncpipe evaluate` on a variable-rate model: one rate point per quality level, progress, card entry."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ncpipe.cli import main
from ncpipe.models.cards import write_card
from ncpipe.models.checkpoint import model_digest, read_checkpoint
from tests.factories import kodak_pixels, train_tiny_codec

LAMBDAS = (0.004, 0.016, 0.064)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> dict[str, Path]:
    """A tiny 3-level model in a registry, evaluated on two 64x96 crops (no baselines) with --update-cards."""
    root = tmp_path_factory.mktemp("variable-rate")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = train_tiny_codec(root, steps=10, lambdas=LAMBDAS)
    crops = root / "crops"
    crops.mkdir()
    for number in (5, 23):
        Image.fromarray(kodak_pixels(number, (64, 96))).save(crops / f"kodim{number:02d}.png")
    checkpoint = read_checkpoint(model)
    folder = root / "models" / "vbr"
    folder.mkdir(parents=True)
    shutil.copy(model, folder / "model.pt")
    write_card(folder, {"name": "vbr", "summary": "test model", "arch": checkpoint["arch"],
                        "hparams": checkpoint["hparams"], "rate": checkpoint["rate"],
                        "sha256": model_digest(checkpoint), "evaluations": []})
    with pytest.MonkeyPatch.context() as env, _progress_messages() as messages:
        env.setenv("NCPIPE_MODEL_DIRS", str(root / "models"))
        assert main(["evaluate", "--images", str(crops), "--models", "vbr", "--no-baselines",
                     "--output", str(root / "out"), "--device", "cpu", "--update-cards"]) == 0
    torch.set_num_threads(threads)
    return {"output": root / "out", "card": folder / "card.json", "progress": messages}


@contextlib.contextmanager
def _progress_messages() -> Iterator[list[str]]:
    """The progress module's log messages (caplog is per test; the fixture that runs the evaluation is not)."""
    logger = logging.getLogger("ncpipe.progress")
    messages: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_every_quality_level_is_a_rate_point_of_one_series(evaluated):
    rows = pq.read_table(evaluated["output"] / "results.parquet").to_pylist()
    assert len(rows) == 2 * len(LAMBDAS)
    assert {r["series"] for r in rows} == {"vbr"}  # a variable-rate model is a curve by itself
    summary = {}
    for row in rows:
        assert row["rate_point"] == f"q{row['quality']}"
        assert row["rate_parameter"] == pytest.approx(LAMBDAS[row["quality"] - 1], rel=1e-6)
        summary.setdefault(row["quality"], []).append(row["bpp"])
    assert sorted(summary) == [1, 2, 3]
    means = [sum(summary[q]) / 2 for q in (1, 2, 3)]
    assert means[0] < means[1] < means[2], means


def test_progress_ends_with_a_report_of_every_image(evaluated):
    assert evaluated["progress"], "no progress was logged"
    assert evaluated["progress"][-1].startswith("evaluate: 6/6 images (100%)")
    assert "ETA 0:00 (vbr q3)" in evaluated["progress"][-1]


def test_the_card_entry_lists_every_quality_level(evaluated):
    summary = pq.read_table(evaluated["output"] / "results.parquet").to_pylist()
    (entry,) = json.loads(evaluated["card"].read_text())["evaluations"]
    assert entry["dataset"] == "crops (2 images)" and entry["images"] == 2 and entry["default_quality"] == 2
    levels = entry["qualities"]
    assert [level["quality"] for level in levels] == [1, 2, 3]
    assert [level["lambda"] for level in levels] == pytest.approx(LAMBDAS, rel=1e-6)
    for level in levels:
        bpp = [r["bpp"] for r in summary if r["quality"] == level["quality"]]
        assert level["bpp"] == pytest.approx(sum(bpp) / 2, rel=1e-12)
        assert set(level) == {"quality", "lambda", "bpp", "psnr", "ms_ssim", "encode_seconds", "decode_seconds"}
    for key in ("bpp", "psnr", "ms_ssim"):  # the top-level numbers are the default quality's
        assert entry[key] == pytest.approx(levels[1][key], rel=1e-12), key
