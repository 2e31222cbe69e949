"""``ncpipe evaluate-refiner`` end to end on two small images with tiny real models."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ncpipe.cli import main
from ncpipe.diffusion.refiner import Refiner, RefinerConfig, TrainedCodec, save_refiner
from ncpipe.diffusion.unet import UNetConfig
from ncpipe.evaluation.refiners import CODEC_METHOD, RefinerEvalConfig, evaluate_refiners
from ncpipe.models.checkpoint import load_codec_model
from tests.factories import kodak_pixels

UNET = UNetConfig(base_channels=8, channel_mults=(1, 2), time_embed_dim=32)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def setup(tmp_path: Path, tiny_model_path: Path) -> dict[str, Path]:
    images = tmp_path / "images"
    images.mkdir()
    for n in (1, 2):
        Image.fromarray(kodak_pixels(n, (48, 64))).save(images / f"k{n}.png")
    identity = load_codec_model(tiny_model_path).identity
    mine = [TrainedCodec(identity.sha256, identity.arch, identity.rate)]
    paths = {"images": images}
    torch.manual_seed(0)
    for label, config, codecs in (
        ("nc", RefinerConfig(unet=UNET), mine),  # untrained: exactly the codec
        ("gauss", RefinerConfig(unet=UNET, process="gaussian", parameterization="x0"), mine),
        ("other", RefinerConfig(unet=UNET), [TrainedCodec("ee" * 32, identity.arch, 0.01)]),
    ):
        paths[label] = tmp_path / f"{label}.pt"
        save_refiner(Refiner(config, codecs), paths[label], {})
    return paths


def test_evaluation_rows_same_bits_and_outputs(setup: dict[str, Path], tiny_model_path: Path, tmp_path: Path) -> None:
    config = RefinerEvalConfig(
        codecs=(str(tiny_model_path),), images=str(setup["images"]), output=str(tmp_path / "out"), steps=(1, 2),
        refiners=tuple((k, str(setup[k])) for k in ("nc", "gauss", "other")), guidance=0.5, device="cpu",
    )
    rows, written = evaluate_refiners(config, command="test")
    methods = {r.method for r in rows}
    assert methods == {CODEC_METHOD, "nc", "nc+guidance", "gauss"}  # "other" is for another codec: skipped
    assert len(rows) == 2 * (1 + 3 * 2)
    for image in ("k1.png", "k2.png"):
        mine = [r for r in rows if r.image == image]
        assert len({r.bpp for r in mine}) == 1 and len({r.num_bytes for r in mine}) == 1
        base = next(r for r in mine if r.method == CODEC_METHOD)
        for r in mine:
            if r.method == "nc":  # the untrained residual refiner returns x̂ exactly
                assert r.psnr == base.psnr and r.outside_bin == base.outside_bin
            if r.method == "nc+guidance":  # applied and measured (that it moves x̂ into its bins: test_guidance.py)
                plain = next(p for p in mine if p.method == "nc" and p.steps == r.steps)
                assert r.guidance == 0.5 and r.psnr != plain.psnr and 0.0 <= r.outside_bin <= 1.0
            if r.method != CODEC_METHOD:
                assert r.decode_seconds >= r.refine_seconds > 0
    names = {p.name for p in written}
    assert {"results.parquet", "results.csv", "summary.csv", "summary.md", "gains.md", "gains.csv",
            "gain_vs_steps.png", "decode_time_vs_steps.png"} <= names
    assert all(0.0 <= r.gmsd < 1.0 and 0.0 < r.haarpsi <= 1.0 and r.hf_ratio >= 0 for r in rows)
    table = pq.read_table(tmp_path / "out" / "results.parquet")
    assert table.num_rows == len(rows) and b"images" in table.schema.metadata
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| nc+guidance | 2 |" in summary and "k1.png, k2.png" in summary and "Perceptual" in summary


def test_every_quality_of_a_variable_rate_codec_with_paired_intervals(tiny_vbr_model_path: Path,
                                                                       tmp_path: Path) -> None:
    """Each quality level is its own bitstream (its λ in the row); gains average the qualities per image and
    carry a paired 95 % interval over the images: exactly 0 for the untrained refiner (x̂ itself)."""
    from ncpipe.evaluation.refiners import gains
    from tests.conftest import TINY_VBR_LAMBDAS

    images = tmp_path / "images"
    images.mkdir()
    for n in (1, 2, 3):
        Image.fromarray(kodak_pixels(n, (48, 64))).save(images / f"k{n}.png")
    identity = load_codec_model(tiny_vbr_model_path).identity
    torch.manual_seed(0)
    save_refiner(Refiner(RefinerConfig(unet=UNET, rate_conditioning=True),
                         [TrainedCodec(identity.sha256, identity.arch, identity.rate)]), tmp_path / "nc.pt", {})
    rows, _ = evaluate_refiners(RefinerEvalConfig(
        codecs=(str(tiny_vbr_model_path),), images=str(images), output=str(tmp_path / "out"), steps=(1,),
        refiners=(("nc", str(tmp_path / "nc.pt")),), qualities=(1, 3), guidance=0.5, device="cpu"))
    codec_rows = {(r.quality, r.image): r for r in rows if r.method == CODEC_METHOD}
    assert sorted({q for q, _ in codec_rows}) == [1, 3] and len(codec_rows) == 6
    assert [float(codec_rows[(q, "k1.png")].rate) for q in (1, 3)] == pytest.approx(
        [TINY_VBR_LAMBDAS[0], TINY_VBR_LAMBDAS[2]], rel=1e-5)
    assert codec_rows[(1, "k1.png")].bpp < codec_rows[(3, "k1.png")].bpp
    table = {g.method: g for g in gains(rows)}
    plain, guided = table["nc"], table["nc+guidance"]
    assert plain.qualities == 2 and plain.images == 3
    assert (plain.delta_psnr, plain.delta_psnr_low, plain.delta_psnr_high) == (0.0, 0.0, 0.0)
    assert guided.delta_psnr_low < guided.delta_psnr < guided.delta_psnr_high
    by_image = {}
    for r in rows:
        if r.method == "nc+guidance":
            by_image.setdefault(r.image, []).append(r.psnr - codec_rows[(r.quality, r.image)].psnr)
    assert guided.delta_psnr == pytest.approx(sum(sum(v) / 2 for v in by_image.values()) / 3)
    assert "| nc+guidance | 1 | 2 | 3 |" in (tmp_path / "out" / "gains.md").read_text()


def test_command_line(setup: dict[str, Path], tiny_model_path: Path, tmp_path: Path) -> None:
    code = main(["-q", "evaluate-refiner", "--codec", str(tiny_model_path), "--refiner", f"nc={setup['nc']}",
                 "--images", str(setup["images"]), "--limit", "1", "--steps", "1", "-o", str(tmp_path / "cli"),
                 "--device", "cpu"])
    assert code == 0
    rows = pq.read_table(tmp_path / "cli" / "results.parquet").to_pylist()
    assert [(r["method"], r["steps"]) for r in rows] == [(CODEC_METHOD, 0), ("nc", 1)]
    with pytest.raises(SystemExit):
        main(["evaluate-refiner", "--codec", "x", "--refiner", "no-equals-sign", "--images", "i", "-o", "o"])
