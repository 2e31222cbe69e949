"""The quality knob of a variable-rate model through the pipeline: compress at a level, restore
without flags, recompress by level; a level the model lacks fails before any work."""

import io
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ncpipe.cli import main
from ncpipe.config import CompressConfig, DecompressConfig, RecompressConfig
from ncpipe.manifest import RESTORE_SCHEMA, read_manifest
from ncpipe.models.checkpoint import QualityError
from ncpipe.pipeline.jobs import run_compress, run_decompress, run_recompress
from tests.conftest import TINY_VBR_LAMBDAS
from tests.factories import encoded, kodak_pixels
from tests.helpers import tar_bytes

KEYS = [f"k{i}" for i in range(4)]


def _rows(archive: Path) -> list[dict]:
    generation = (archive / "CURRENT").read_text().strip()
    return read_manifest(str(archive / generation / "manifest")).to_pylist()


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive.getmembers()}


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("quality") / "in" / "part-0.tar"
    path.parent.mkdir()
    members = []
    for i, key in enumerate(KEYS):
        members += [(f"{key}.png", encoded(kodak_pixels(3 + i, (64, 96)))), (f"{key}.txt", b"meta %d" % i)]
    path.write_bytes(tar_bytes(members))
    return path


@pytest.fixture(scope="module")
def archives(shard, tiny_vbr_model_path) -> dict[int, Path]:
    """The same shard compressed at the lowest and the highest quality level."""
    out = {}
    for quality in (1, 3):
        out[quality] = shard.parent.parent / f"q{quality}"
        summary = run_compress(CompressConfig(inputs=(str(shard),), output=str(out[quality]),
                                              model=str(tiny_vbr_model_path), quality=quality))
        assert summary.complete and summary.ok == len(KEYS)
    return out


def test_each_level_is_recorded_and_restored_without_a_quality_flag(archives, shard, tiny_vbr_model_path, tmp_path):
    # Both archives' shards restored by one job, no quality named anywhere: each bitstream's header says it.
    restored = tmp_path / "restored"
    summary = run_decompress(DecompressConfig(
        inputs=tuple(str(archive / "g0000" / "shards") for archive in archives.values()), output=str(restored),
        model=str(tiny_vbr_model_path)))
    assert summary.complete and summary.ok == 2 * len(KEYS)
    outputs = {r["source_url"]: r["output"] for r in read_manifest(str(restored / "_restore_manifest"),
                                                                    RESTORE_SCHEMA).to_pylist()}
    originals = _members(shard)
    mean_bpp = {}
    for quality, archive in archives.items():
        rows = _rows(archive)
        assert {r["quality"] for r in rows} == {quality}
        assert all(r["rd_lambda"] == pytest.approx(TINY_VBR_LAMBDAS[quality - 1]) for r in rows)
        mean_bpp[quality] = np.mean([r["bpp"] for r in rows])
        images = _members(Path(outputs[rows[0]["output_shard"]]))
        for row in rows:  # the PSNR the encoder measured is what the flagless restore gives
            source = np.asarray(Image.open(io.BytesIO(originals[f"{row['key']}.png"])), dtype=float)
            image = np.asarray(Image.open(io.BytesIO(images[f"{row['key']}.png"])), dtype=float)
            psnr = 10 * np.log10(255**2 / np.mean((image - source) ** 2))
            assert psnr == pytest.approx(row["psnr"], abs=0.05)
    assert mean_bpp[1] < mean_bpp[3]


@pytest.mark.parametrize("quality, model, expected", [
    (7, "tiny_vbr_model_path", "quality 7 is outside 1..3"),
    (1, "tiny_model_path", "is a fixed-rate model: it has no quality 1"),
])
def test_a_level_the_model_lacks_fails_before_any_work(shard, tmp_path, caplog, request, quality, model, expected):
    output = tmp_path / "out"
    argv = ["compress", str(shard), "-o", str(output), "-m", str(request.getfixturevalue(model)),
            "--quality", str(quality)]
    with caplog.at_level(logging.ERROR, logger="ncpipe"):
        assert main(argv) == 2
    (message,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert expected in message and "\n" not in message
    assert not output.exists()


def test_recompress_with_a_level_the_target_lacks_fails_before_any_work(archives, tiny_model_path):
    with pytest.raises(QualityError, match="fixed-rate"):
        run_recompress(RecompressConfig(archive=str(archives[1]), model=str(tiny_model_path), quality=2))
    assert (archives[1] / "CURRENT").read_text().strip() == "g0000" and not (archives[1] / "g0001").exists()


def test_recompress_above_a_level_reencodes_only_those_samples(archives, tiny_vbr_model_path):
    archive, model = archives[3], str(tiny_vbr_model_path)
    threshold = sorted(r["bpp"] for r in _rows(archive))[1]  # the two largest go to level 2
    lowered = run_recompress(RecompressConfig(archive=str(archive), model=model, quality=2, max_bpp=threshold))
    assert lowered.complete and lowered.selected == 2
    mixed = {r["key"]: r for r in _rows(archive)}
    assert sorted(r["quality"] for r in mixed.values()) == [2, 2, 3, 3]

    assert main(["recompress", str(archive), "-m", model, "--quality-above", "2", "--quality", "1"]) == 0
    final = {r["key"]: r for r in _rows(archive)}
    for key, before in mixed.items():
        after = final[key]
        if before["quality"] == 3:
            assert after["quality"] == 1 and after["rd_lambda"] == pytest.approx(TINY_VBR_LAMBDAS[0])
            assert after["previous_compressed_bytes"] == before["compressed_bytes"] > after["compressed_bytes"]
        else:  # written through as it was
            assert {k: v for k, v in after.items() if k not in ("generation", "output_shard")} == \
                   {k: v for k, v in before.items() if k not in ("generation", "output_shard")}
    again = run_recompress(RecompressConfig(archive=str(archive), model=model, quality=1, quality_above=2))
    assert again.selected == 0 and again.generation is None


def test_a_quality_enters_the_fingerprint_only_when_given():
    config = CompressConfig(inputs=("a.tar",), output="o")
    assert config.coding_fingerprint("ab" * 32) == "27e06a0689163c91"  # as before the quality field existed
    fingerprints = {CompressConfig(inputs=("a.tar",), output="o", quality=q).coding_fingerprint("ab" * 32)
                    for q in (None, 1, 2)}
    assert len(fingerprints) == 3
