"""`ncpipe evaluate` end to end: a tiny model and every available baseline on two Kodak crops."""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
from pathlib import Path

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ncpipe.cli import build_parser, main
from ncpipe.cli import evaluate as commands
from ncpipe.codec import LearnedCodec
from ncpipe.evaluation import baselines, run
from ncpipe.evaluation.learned import load_image_set
from ncpipe.evaluation.run import BdEntry, SummaryRow, bd_table
from ncpipe.models.cards import write_card
from ncpipe.models.checkpoint import load_codec_model, model_digest, read_checkpoint
from tests.factories import REPO_ROOT, kodak_pixels

AVAILABLE = sorted(baselines.available_baselines())
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
OUTPUTS = ("results.parquet", "results.csv", "summary.csv", "bd_rate.json", "bd_rate.md", "rd_psnr.png", "rd_msssim.png")
OTHER_ENTRY = {"dataset": "elsewhere (9 images)", "bpp": 1.0, "psnr": 30.0, "ms_ssim": 0.9, "images": 9,
               "encode_seconds": 1.0, "decode_seconds": 1.0, "date": "d", "machine": "m", "command": "c"}


def evaluate_config_from(argv: list[str]) -> run.EvaluateConfig:
    return commands.evaluate_config(build_parser().parse_args(["evaluate", *argv]))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_path) -> dict[str, Path]:
    """Two Kodak crops and a registry holding the tiny model (with a card measured elsewhere)."""
    root = tmp_path_factory.mktemp("evaluate")
    crops = root / "crops"
    crops.mkdir()
    for number, box in ((5, (0, 128, 64, 256)), (23, (64, 192, 128, 320))):
        top, bottom, left, right = box
        Image.fromarray(kodak_pixels(number)[top:bottom, left:right]).save(crops / f"kodim{number:02d}.png")
    checkpoint = read_checkpoint(tiny_model_path)
    folder = root / "models" / "tiny"
    folder.mkdir(parents=True)
    shutil.copy(tiny_model_path, folder / "model.pt")
    write_card(folder, {
        "name": "tiny", "summary": "test model", "arch": checkpoint["arch"], "hparams": checkpoint["hparams"],
        "rate": checkpoint["rate"], "sha256": model_digest(checkpoint), "evaluations": [OTHER_ENTRY],
    })
    return {"root": root, "crops": crops, "models": root / "models", "card": folder / "card.json"}


@pytest.fixture(scope="module")
def evaluated(workspace) -> Path:
    """One evaluate run through the CLI with every available baseline, updating the card."""
    output = workspace["root"] / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("NCPIPE_MODEL_DIRS", str(workspace["models"]))
        assert main(["evaluate", "--images", str(workspace["crops"]), "--models", "tiny", "--baselines", *AVAILABLE,
                     "--output", str(output), "--device", "cpu", "--update-cards"]) == 0
    torch.set_num_threads(threads)
    return output


def test_every_output_is_written(evaluated):
    for name in OUTPUTS:
        assert (evaluated / name).is_file(), name
    for plot in ("rd_psnr.png", "rd_msssim.png"):
        assert (evaluated / plot).read_bytes()[:8] == PNG_SIGNATURE
        assert Image.open(evaluated / plot).size == (640, 480)


def test_results_hold_every_image_codec_and_rate_point(evaluated, workspace):
    table = pq.read_table(evaluated / "results.parquet")
    rows = table.to_pylist()
    expected = 2 * (1 + sum(len(baselines.QUALITY_LEVELS[name]) for name in AVAILABLE))
    assert len(rows) == expected
    assert pacsv.read_csv(evaluated / "results.csv").num_rows == expected
    assert {r["codec"] for r in rows} == {"tiny", *AVAILABLE}
    # A fixed-rate model is one rate point, named by its λ; baselines name their own quality in rate_point.
    assert {(r["rate_point"], r["quality"]) for r in rows if r["codec"] == "tiny"} == {("λ=0.01", 0)}
    assert all(r["quality"] == 0 for r in rows)
    for row in rows:
        assert row["bpp"] == pytest.approx(8 * row["num_bytes"] / (row["width"] * row["height"]))
        assert row["psnr"] > 5 and 0 < row["ms_ssim"] <= 1 and row["encode_seconds"] > 0
    metadata = json.loads(table.schema.metadata[b"command"])
    assert metadata.startswith("ncpipe evaluate --images") and "--update-cards" in metadata


def test_learned_bpp_is_the_size_of_the_real_bitstream(evaluated, workspace, tiny_model_path):
    rows = [r for r in pq.read_table(evaluated / "results.parquet").to_pylist() if r["codec"] == "tiny"]
    codec = LearnedCodec(load_codec_model(tiny_model_path), coder_threads=1)
    try:
        for row in rows:
            ((_, image),) = load_image_set([workspace["crops"] / row["image"]])
            (data,) = codec.encode_batch([image], ["RGB"])
            assert row["num_bytes"] == len(data)
    finally:
        codec.close()


def test_bd_rate_table_is_computed_from_the_summary(evaluated):
    summary = [SummaryRow(**row) for row in pacsv.read_csv(evaluated / "summary.csv").to_pylist()]
    document = json.loads((evaluated / "bd_rate.json").read_text())
    entries = document["entries"]
    assert {(e["series"], e["baseline"], e["metric"]) for e in entries} == {
        ("mbt2018-mean", name, metric) for name in AVAILABLE for metric in ("psnr", "ms_ssim_db")}
    assert [BdEntry(**e).error for e in entries] == [e.error for e in bd_table(summary)]
    # One learned rate point is not a curve: every entry says so instead of holding a number.
    assert all(e["bd_rate_percent"] is None and "needs at least 2 points" in e["error"] for e in entries)
    markdown = (evaluated / "bd_rate.md").read_text()
    assert all(f"| mbt2018-mean | {name} |" in markdown for name in AVAILABLE)


def test_bd_table_against_a_measured_baseline_curve(evaluated):
    """A learned series that needs exactly 20% fewer bits than the measured JPEG curve scores -20%."""
    summary = [SummaryRow(**row) for row in pacsv.read_csv(evaluated / "summary.csv").to_pylist()]
    jpeg = [r for r in summary if r.codec == "jpeg"]
    learned = [dataclasses.replace(r, kind="learned", series="s", codec=f"m{i}", bpp=0.8 * r.bpp)
               for i, r in enumerate(jpeg)]
    entries = {e.metric: e for e in bd_table([*jpeg, *learned])}
    for metric in ("psnr", "ms_ssim_db"):
        assert entries[metric].error is None
        assert entries[metric].bd_rate_percent == pytest.approx(-20.0, abs=1e-9)
        assert entries[metric].bd_quality > 0


def test_bd_table_compares_learned_series_with_each_other(evaluated):
    """A new model's series that needs 10% fewer bits than an older series scores -10% against it (and not
    against itself); baselines stay anchors of both."""
    summary = [SummaryRow(**row) for row in pacsv.read_csv(evaluated / "summary.csv").to_pylist()]
    jpeg = [r for r in summary if r.codec == "jpeg"]
    old = [dataclasses.replace(r, kind="learned", series="old", codec=f"o{i}") for i, r in enumerate(jpeg)]
    new = [dataclasses.replace(r, series="new", codec=f"n{i}", bpp=0.9 * r.bpp) for i, r in enumerate(old)]
    entries = {(e.series, e.baseline, e.metric): e for e in bd_table([*jpeg, *old, *new])}
    assert entries[("new", "old", "psnr")].bd_rate_percent == pytest.approx(-10.0, abs=1e-9)
    assert entries[("old", "new", "psnr")].bd_rate_percent > 0
    assert {(s, b) for s, b, _ in entries} == {("old", "jpeg"), ("new", "jpeg"), ("new", "old"), ("old", "new")}


def test_update_cards_writes_the_measured_means(evaluated, workspace):
    card = json.loads(workspace["card"].read_text())
    assert card["evaluations"][0] == OTHER_ENTRY  # another image set's entry is kept
    (entry,) = [e for e in card["evaluations"] if e["dataset"] == "crops (2 images)"]
    (summary,) = [r for r in pacsv.read_csv(evaluated / "summary.csv").to_pylist() if r["codec"] == "tiny"]
    for key in ("bpp", "psnr", "ms_ssim", "encode_seconds", "decode_seconds"):
        assert entry[key] == pytest.approx(summary[key], rel=1e-12), key
    assert entry["images"] == 2 and entry["device"] == "cpu" and entry["command"].startswith("ncpipe evaluate")
    assert "qualities" not in entry and "default_quality" not in entry  # a fixed-rate entry is as before
    readme = (workspace["card"].parent / "README.md").read_text()
    assert "## Measured: crops (2 images)" in readme and f"bpp {entry['bpp']:.4f}" in readme


def test_a_second_run_is_identical_and_replaces_the_card_entry(evaluated, workspace, monkeypatch):
    monkeypatch.setenv("NCPIPE_MODEL_DIRS", str(workspace["models"]))
    torch.set_num_threads(1)
    again = workspace["root"] / "again"
    assert main(["evaluate", "--images", str(workspace["crops"]), "--models", "tiny", "--baselines", "jpeg",
                 "--output", str(again), "--device", "cpu", "--update-cards"]) == 0
    first = {(r["codec"], r["rate_point"], r["image"]): r for r in pq.read_table(evaluated / "results.parquet").to_pylist()}
    second = pq.read_table(again / "results.parquet").to_pylist()
    assert second and all(r["codec"] in ("tiny", "jpeg") for r in second)
    for row in second:
        before = first[(row["codec"], row["rate_point"], row["image"])]
        assert row["num_bytes"] == before["num_bytes"] and row["bpp"] == before["bpp"]
        assert row["psnr"] == pytest.approx(before["psnr"], abs=1e-6)
        assert row["ms_ssim"] == pytest.approx(before["ms_ssim"], abs=1e-6)
    card = json.loads(workspace["card"].read_text())
    assert [e["dataset"] for e in card["evaluations"]] == ["elsewhere (9 images)", "crops (2 images)"]


def test_a_missing_baseline_is_named_before_any_work(workspace, tmp_path, monkeypatch, caplog):
    unavailable = tuple(dataclasses.replace(b, available=lambda: False) for b in baselines._BACKENDS["webp"])
    monkeypatch.setitem(baselines._BACKENDS, "webp", unavailable)
    assert main(["evaluate", "--images", str(workspace["crops"]), "--models", str(workspace["models"] / "tiny"),
                 "--output", str(tmp_path / "out")]) == 2
    assert "baseline(s) ['webp'] unavailable here" in caplog.text
    assert not (tmp_path / "out").exists()


def test_missing_images_and_unknown_models_are_named(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv(run.IMAGES_ENV, raising=False)
    assert main(["evaluate", "--no-baselines", "--output", str(tmp_path / "out")]) == 2
    assert "images: no image folder given; pass --images DIR or set NCPIPE_EVAL_IMAGES" in caplog.text
    monkeypatch.setenv(run.IMAGES_ENV, str(tmp_path / "no-kodak"))
    assert main(["evaluate", "--no-baselines", "--output", str(tmp_path / "out")]) == 2
    assert f"image folder {tmp_path / 'no-kodak'} (from NCPIPE_EVAL_IMAGES) does not exist" in caplog.text
    (tmp_path / "imgs").mkdir()
    Image.fromarray(kodak_pixels(1, (64, 64))).save(tmp_path / "imgs" / "a.png")
    assert main(["evaluate", "--images", str(tmp_path / "imgs"), "--models", "no-such-model", "--no-baselines"]) == 2
    assert "no model named or at 'no-such-model'" in caplog.text
    assert not (tmp_path / "out").exists()


def test_spec_file_and_flag_overrides(tmp_path):
    config = evaluate_config_from(["--spec", str(REPO_ROOT / "jobs" / "evaluate-kodak.yaml")])
    assert config.images is None and config.models == () and config.update_cards is True
    assert config.baselines == baselines.BASELINE_NAMES
    config = evaluate_config_from(["--spec", str(REPO_ROOT / "jobs" / "evaluate-kodak.yaml"), "--no-update-cards",
                                   "--no-baselines", "--max-images", "2", "--models", "a", "b"])
    assert config.update_cards is False and config.baselines == () and config.max_images == 2
    assert config.models == ("a", "b") and config.output == "out/evaluate-kodak"
    assert evaluate_config_from([]) == run.EvaluateConfig()
    train_spec = REPO_ROOT / "jobs" / "train-codec.yaml"
    with pytest.raises(ValueError, match="kind is 'train-codec', but this command runs kind 'evaluate'"):
        evaluate_config_from(["--spec", str(train_spec)])


def test_cli_covers_the_config_and_records_a_command_that_reproduces_it():
    assert commands._BASELINE_NAMES == baselines.BASELINE_NAMES
    assert commands._FIELDS == tuple(f.name for f in dataclasses.fields(run.EvaluateConfig))
    config = run.EvaluateConfig(images="some dir", models=("a", "b/c.pt"), baselines=(), output="o", device="cpu",
                                update_cards=True, max_images=3, dataset="Kodak")
    words = shlex.split(run.equivalent_command(config))
    assert words[:2] == ["ncpipe", "evaluate"] and evaluate_config_from(words[2:]) == config
    assert run.equivalent_command(run.EvaluateConfig()) == "ncpipe evaluate"
