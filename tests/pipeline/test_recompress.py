"""Recompression: policy selection, new generations with lineage, atomic switch, idempotence."""

import dataclasses
import json
import tarfile
from pathlib import Path

import pytest

from ncpipe.config import CompressConfig, ConfigError, RecompressConfig
from ncpipe.manifest import read_manifest
from ncpipe.models.checkpoint import model_digest, read_checkpoint
from ncpipe.pipeline import recompress
from ncpipe.pipeline.jobs import run_compress, run_recompress
from ncpipe.pipeline.recompress import CodingTarget, RecompressPolicy, is_selected
from tests.factories import encoded, kodak_pixels, train_tiny_codec
from tests.helpers import tar_bytes


def _members(path) -> dict[str, bytes]:
    with tarfile.open(path) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive.getmembers()}


@pytest.fixture(scope="module")
def archive(tmp_path_factory, tiny_model_path):
    root = tmp_path_factory.mktemp("recompress")
    (root / "originals").mkdir()
    for s in range(2):
        members = []
        for i in range(3):
            members += [(f"k{s}{i}.png", encoded(kodak_pixels(10 + 3 * s + i, (64, 96)))), (f"k{s}{i}.txt", b"meta %d" % i)]
        (root / "originals" / f"part-{s}.tar").write_bytes(tar_bytes(members))
    summary = run_compress(CompressConfig(inputs=(str(root / "originals"),), output=str(root / "archive"),
                                          model=str(tiny_model_path)))
    assert summary.complete
    target = train_tiny_codec(root / "target", steps=3, lambdas=(0.05,))
    return root, target


def _rows(archive_dir: Path, generation: str) -> list[dict]:
    return read_manifest(str(archive_dir / generation / "manifest")).to_pylist()


def test_dry_run_writes_nothing(archive):
    root, target = archive
    summary = run_recompress(RecompressConfig(archive=str(root / "archive"), model=str(target), dry_run=True))
    assert summary.dry_run and summary.selected == 6 and summary.bytes_before > 0
    assert not (root / "archive" / "g0001").exists()
    assert (root / "archive" / "CURRENT").read_text().strip() == "g0000"


def test_recompress_from_originals_then_nothing_to_do(archive, tiny_model_path):
    root, target = archive
    out = root / "archive"
    before = _rows(out, "g0000")
    summary = run_recompress(RecompressConfig(archive=str(out), model=str(target)))
    assert summary.complete and summary.switched and summary.generation == "g0001"
    assert summary.from_originals == 6 and summary.transcoded == 0 and summary.kept == 0
    assert (out / "CURRENT").read_text().strip() == "g0001"
    target_sha = model_digest(read_checkpoint(target))
    rows = _rows(out, "g0001")
    assert len(rows) == 6
    previous = {(r["source_url"], r["sample_index"]): r for r in before}
    for row in rows:
        old = previous[(row["source_url"], row["sample_index"])]
        assert row["model_sha256"] == target_sha and row["generation"] == "g0001"
        assert row["recompress_source"] == "original" and row["psnr"] is not None
        assert row["previous_model_sha256"] == old["model_sha256"]
        assert row["previous_compressed_bytes"] == old["compressed_bytes"]
    for part in ("part-0", "part-1"):
        new, old = _members(out / "g0001" / "shards" / f"{part}.tar"), _members(out / "g0000" / "shards" / f"{part}.tar")
        assert {n for n in new if n.endswith(".txt")} == {n for n in old if n.endswith(".txt")}
        assert all(new[n] == old[n] for n in new if n.endswith(".txt"))
        assert all(new[n] != old[n] for n in new if n.endswith(".ncb"))
    again = run_recompress(RecompressConfig(archive=str(out), model=str(target)))
    assert again.selected == 0 and again.generation is None and not (out / "g0002").exists()
    assert (out / "CURRENT").read_text().strip() == "g0001"


def test_transcoding_records_generation_loss_and_keeps_unselected(archive, tiny_model_path):
    root, target = archive
    out = root / "archive"
    current = (out / "CURRENT").read_text().strip()
    rows = _rows(out, current)
    threshold = sorted(r["bpp"] for r in rows)[2]  # selects the three largest
    summary = run_recompress(RecompressConfig(archive=str(out), model=str(tiny_model_path), max_bpp=threshold,
                                              transcode_only=True, decode_models=(str(target),)))
    assert summary.selected == 3 and summary.transcoded == 3 and summary.mean_generation_loss_db > 0
    new_rows = _rows(out, summary.generation)
    assert len([r for r in new_rows if r["psnr_vs_previous"] is not None]) == 3
    assert all(r["psnr"] is None for r in new_rows if r["psnr_vs_previous"] is not None)
    kept = [r for r in new_rows if r["bpp"] <= threshold and r["psnr_vs_previous"] is None]
    assert len(kept) == 3
    job = json.loads((out / summary.generation / "job.json").read_text())
    assert job["previous_generation"] == current


def test_compress_again_over_a_recompressed_archive_replaces_every_generation(archive, tiny_model_path):
    root, _ = archive
    out = root / "archive"
    assert (out / "CURRENT").read_text().strip() != "g0000" and (out / "g0001").is_dir()
    config = CompressConfig(inputs=(str(root / "originals"),), output=str(out), model=str(tiny_model_path))
    with pytest.raises(ConfigError, match="was recompressed.*--overwrite"):
        run_compress(config)
    assert (out / "g0001").is_dir()
    summary = run_compress(dataclasses.replace(config, overwrite=True))
    assert summary.complete and summary.generation == "g0000"
    assert (out / "CURRENT").read_text().strip() == "g0000"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["g0000"]  # nothing replaced is left behind


def test_policy_conditions(monkeypatch):
    monkeypatch.setattr(recompress, "release_date", lambda sha: {"old": "2026-01-01 00:00 UTC"}.get(sha))
    row = {"status": "ok", "model_sha256": "old", "quality": None, "psnr": 30.0, "bpp": 0.5}
    new = CodingTarget("new")
    assert is_selected(row, new, RecompressPolicy(), None)
    assert not is_selected({**row, "model_sha256": "new"}, new, RecompressPolicy(), None)
    assert not is_selected({**row, "status": "error"}, new, RecompressPolicy(), None)
    assert is_selected(row, new, RecompressPolicy(min_psnr=31), None)
    assert not is_selected(row, new, RecompressPolicy(min_psnr=29, max_bpp=0.6), None)
    assert is_selected(row, new, RecompressPolicy(min_psnr=29, max_bpp=0.4), None)
    assert is_selected(row, new, RecompressPolicy(older_than_model="x"), "2026-06-01 00:00 UTC")
    assert not is_selected(row, new, RecompressPolicy(older_than_model="x"), "2025-06-01 00:00 UTC")
    assert is_selected({**row, "model_sha256": "unknown"}, new, RecompressPolicy(older_than_model="x"), "2025-06-01 00:00 UTC")


def test_quality_policy_and_target():
    row = {"status": "ok", "model_sha256": "vbr", "quality": 3, "psnr": 30.0, "bpp": 0.5}
    fixed_rate_row = {**row, "model_sha256": "fixed", "quality": None}
    above_2 = RecompressPolicy(quality_above=2)
    assert is_selected(row, CodingTarget("vbr", 1), above_2, None)
    assert not is_selected({**row, "quality": 2}, CodingTarget("vbr", 1), above_2, None)
    assert not is_selected(row, CodingTarget("vbr", 3), above_2, None)  # already coded by the target
    assert not is_selected(fixed_rate_row, CodingTarget("vbr", 1), above_2, None)
    # a row from before the quality column (null) was coded by a fixed-rate model, quality 0
    assert not is_selected(fixed_rate_row, CodingTarget("fixed"), RecompressPolicy(), None)
    assert is_selected(fixed_rate_row, CodingTarget("fixed", 1), RecompressPolicy(), None)
    assert above_2.describe() == "quality > 2"
    # fingerprints of policies without the condition stay as they were before it existed
    assert "quality_above" not in RecompressPolicy(max_bpp=1.0).fingerprint_fields()
