"""CorrDiff through the CLI: `compress --corrdiff` writes coefficients into v2 bitstreams and records them;
`decompress --decoder corrdiff --perception p` decodes a small shard with them (p = 0 is the codec's own
restore, p = 0.5 is reproducible and recorded), and a v1 archive is refused up front, saying why."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ncpipe import bitstream as fmt
from ncpipe.cli import main
from ncpipe.cli.exit_status import EXIT_USAGE
from ncpipe.codec import LearnedCodec, to_uint8_image
from ncpipe.config import CompressConfig, ConfigError, DecompressConfig
from ncpipe.diffusion.corrdiff import corrdiff_decode, load_corrdiff, read_corrections
from ncpipe.manifest import MANIFEST_SCHEMA, RESTORE_SCHEMA, read_manifest
from ncpipe.models.checkpoint import load_codec_model
from ncpipe.pipeline.jobs import restore_fingerprint
from ncpipe.train.corrdiff_trainer import CorrDiffTrainConfig, train_corrdiff
from tests.factories import BSDS, encoded, kodak_pixels
from tests.helpers import tar_bytes

TINY_DECODER = dict(base_channels=8, channel_mults=(1, 2), time_embed_dim=32, latent_features=2, conditioner_hidden=8,
                    crop=32, batch_size=2, lr=1e-3, warmup_steps=1, log_every=1, device="cpu", threads=1, steps=3,
                    checkpoint_every=3)
STEPS = 2  # K given at compression (the decoder's default is 4): the decoder must take K from the bitstream


def _members(tar_path: Path, suffix: str) -> dict[str, bytes]:
    with tarfile.open(tar_path) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive.getmembers() if m.name.endswith(suffix)}


def _pixels(pngs: dict[str, bytes]) -> dict[str, np.ndarray]:
    return {name: np.asarray(Image.open(io.BytesIO(data))) for name, data in pngs.items()}


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_model_path) -> Path:
    """A 3-image shard compressed twice with the tiny codec: plain (v1), and with a tiny trained decoder's
    coefficients (v2)."""
    root = tmp_path_factory.mktemp("corrdiff")
    members = [(f"c{i}.png", encoded(kodak_pixels(10 + i, (64, 80)))) for i in range(3)]
    (root / "in.tar").write_bytes(tar_bytes(members))
    data = tuple(str(p) for p in sorted((BSDS / "val").glob("*.jpg"))[:2])
    train_corrdiff(CorrDiffTrainConfig(codec=str(tiny_model_path), data=data, run_dir=str(root / "run"),
                                       **TINY_DECODER))
    base = ["compress", str(root / "in.tar"), "--model", str(tiny_model_path)]
    assert main([*base, "-o", str(root / "plain")]) == 0
    assert main([*base, "-o", str(root / "corrdiff"), "--corrdiff", str(root / "run" / "corrdiff.pt"),
                 "--corrdiff-steps", str(STEPS)]) == 0
    return root


def _restore(root: Path, archive: str, out: str, model: Path, *extra: str) -> list[dict]:
    assert main(["decompress", str(root / archive), "-o", str(root / out), "--model", str(model), *extra]) == 0
    return read_manifest(str(root / out / "_restore_manifest"), RESTORE_SCHEMA).to_pylist()


def _corrdiff(root: Path, perception: float) -> list[str]:
    return ["--decoder", "corrdiff", "--corrdiff", str(root / "run" / "corrdiff.pt"), "--perception", str(perception)]


def test_compress_writes_the_coefficients_and_records_them(root: Path) -> None:
    sha = load_corrdiff(root / "run" / "corrdiff.pt").sha256
    plain = {r["key"]: r for r in read_manifest(str(root / "plain" / "g0000" / "manifest")).to_pylist()}
    rows = read_manifest(str(root / "corrdiff" / "g0000" / "manifest")).to_pylist()
    bitstreams = _members(root / "corrdiff" / "g0000" / "shards" / "in.tar", ".ncb")
    assert len(rows) == 3 and all(r["status"] == "ok" and r["corrdiff_sha256"] == sha for r in rows)
    for row in rows:
        data = bitstreams[f"{row['key']}.ncb"]
        coefficients = read_corrections(data)
        assert fmt.parse_header(data).version == 2
        assert coefficients.decoder_sha256 == sha and len(coefficients.indexes) == STEPS
        # the coefficients are inside the bitstream, so counted in its bytes and bpp
        assert row["compressed_bytes"] == len(data) == plain[row["key"]]["compressed_bytes"] + row["corrdiff_bytes"]
        assert row["bpp"] > plain[row["key"]]["bpp"]
    assert all(r["corrdiff_sha256"] is None and r["corrdiff_bytes"] is None for r in plain.values())
    job = json.loads((root / "corrdiff" / "g0000" / "job.json").read_text())
    assert job["corrdiff"]["sha256"] == sha and job["config"]["corrdiff_steps"] == STEPS


@pytest.fixture(scope="module")
def codec_restore(root: Path, tiny_model_path: Path) -> dict[str, np.ndarray]:
    """The v2 archive restored by the codec's own decoder (the coefficients are ignored)."""
    _restore(root, "corrdiff", "codec", tiny_model_path)
    return _pixels(_members(root / "codec" / "in.tar", ".png"))


def _in_process(root: Path, tiny_model_path: Path, perception: float) -> dict[str, np.ndarray]:
    """What CorrDiff decodes from the archive's bitstreams, computed here without the pipeline."""
    decoder = load_corrdiff(root / "run" / "corrdiff.pt")
    codec = LearnedCodec(load_codec_model(tiny_model_path), coder_threads=1)
    outputs = {}
    for name, data in _members(root / "corrdiff" / "g0000" / "shards" / "in.tar", ".ncb").items():
        header, symbols = codec.decode_symbols(data)
        (image,) = corrdiff_decode(decoder, codec, [header], [symbols], [read_corrections(data)], perception)
        outputs[name.replace(".ncb", ".png")] = to_uint8_image(image)
    codec.close()
    return outputs


def test_corrdiff_decode_endpoints_determinism_and_manifest(root: Path, tiny_model_path: Path,
                                                            codec_restore: dict[str, np.ndarray]) -> None:
    sha = load_corrdiff(root / "run" / "corrdiff.pt").sha256
    rows = _restore(root, "corrdiff", "p0", tiny_model_path, *_corrdiff(root, 0.0))
    assert all(r["status"] == "ok" and r["perception"] == 0.0 for r in rows)
    p0 = _pixels(_members(root / "p0" / "in.tar", ".png"))
    assert set(codec_restore) == set(p0) == {"c0.png", "c1.png", "c2.png"}
    assert all(np.array_equal(codec_restore[k], p0[k]) for k in p0)  # p = 0 is the end-to-end decoder, exactly

    rows = _restore(root, "corrdiff", "half", tiny_model_path, *_corrdiff(root, 0.5))
    _restore(root, "corrdiff", "again", tiny_model_path, *_corrdiff(root, 0.5))
    half = _members(root / "half" / "in.tar", ".png")
    assert half == _members(root / "again" / "in.tar", ".png")
    assert len(rows) == 3 and all(r["status"] == "ok" and r["error"] is None for r in rows)
    assert all(r["corrdiff_sha256"] == sha and r["perception"] == 0.5 and r["refiner_sha256"] is None for r in rows)
    # the pipeline's images are CorrDiff's, with the transmitted coefficients and K (not the decoder's default)
    expected = _in_process(root, tiny_model_path, 0.5)
    assert all(np.array_equal(pixels, expected[k]) for k, pixels in _pixels(half).items())
    # and the diffusion decoder does change the image away from x̂ (p = 1: no correction at all)
    assert any(not np.array_equal(v, codec_restore[k]) for k, v in _in_process(root, tiny_model_path, 1.0).items())


def test_a_v1_archive_is_refused_up_front_and_says_why(root: Path, tiny_model_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """An archive compressed without coefficients cannot be CorrDiff-decoded: refused before any shard runs."""
    code = main(["decompress", str(root / "plain"), "-o", str(root / "plain-corrdiff"), "--model",
                 str(tiny_model_path), *_corrdiff(root, 0.5)])
    assert code == EXIT_USAGE
    assert "compressed without CorrDiff coefficients" in caplog.text
    assert not (root / "plain-corrdiff" / "in.tar").exists()


def test_configs_refuse_bad_corrdiff_options_naming_the_field() -> None:
    with pytest.raises(ConfigError, match="^corrdiff_steps:"):
        CompressConfig(inputs=("a",), output="o", corrdiff_steps=4)
    with pytest.raises(ConfigError, match="^corrdiff_bits:"):
        CompressConfig(inputs=("a",), output="o", corrdiff="d.pt", corrdiff_bits=9)
    with pytest.raises(ConfigError, match="^corrdiff:"):
        DecompressConfig(inputs=("a",), output="o", decoder="corrdiff")
    with pytest.raises(ConfigError, match="^perception:"):
        DecompressConfig(inputs=("a",), output="o", decoder="corrdiff", corrdiff="d.pt", perception=1.5)
    with pytest.raises(ConfigError, match="^decoder:"):
        DecompressConfig(inputs=("a",), output="o", corrdiff="d.pt")
    with pytest.raises(ConfigError, match="^refiner:"):
        DecompressConfig(inputs=("a",), output="o", decoder="corrdiff", corrdiff="d.pt", refiner="r.pt")


def test_fingerprints_separate_corrdiff_jobs(root: Path) -> None:
    decoder = str(root / "run" / "corrdiff.pt")
    plain = CompressConfig(inputs=("a",), output="o")
    # a job without CorrDiff keeps the fingerprint it had before the option existed
    assert plain.coding_fingerprint("ab") == "32fef0f2c41bd4d0"
    with_corrdiff = CompressConfig(inputs=("a",), output="o", corrdiff=decoder)
    assert with_corrdiff.coding_fingerprint("ab", "cd") not in (plain.coding_fingerprint("ab"),
                                                                with_corrdiff.coding_fingerprint("ab", "ef"))
    restores = [DecompressConfig(inputs=("a",), output="o", decoder="corrdiff", corrdiff=decoder, perception=p)
                for p in (0.0, 0.5)]
    fingerprints = {restore_fingerprint(c) for c in [*restores, DecompressConfig(inputs=("a",), output="o")]}
    assert len(fingerprints) == 3


def test_a_manifest_part_written_before_a_column_existed_reads_it_as_null(tmp_path: Path) -> None:
    old_schema = pa.schema([f for f in MANIFEST_SCHEMA if not f.name.startswith("corrdiff")])
    part = tmp_path / "manifest" / "old.parquet"
    part.parent.mkdir()
    pq.write_table(pa.Table.from_pylist([{"job_id": "j", "source_url": "s", "sample_index": 0, "key": "k",
                                          "status": "ok", "passthrough": False, "carried_members": []}],
                                        schema=old_schema), part)
    (row,) = read_manifest(str(part.parent)).to_pylist()
    assert row["key"] == "k" and row["corrdiff_sha256"] is None and row["corrdiff_bytes"] is None
