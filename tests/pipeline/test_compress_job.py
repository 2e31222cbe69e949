"""Compress and decompress jobs end to end: real tar shards, a real local Ray, real Parquet."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
from PIL import Image

from ncpipe.config import ClusterConfig, CompressConfig, ConfigError, DecompressConfig
from ncpipe.manifest import RESTORE_SCHEMA, read_manifest
from ncpipe.pipeline.jobs import run_compress, run_decompress
from tests.factories import encoded, kodak_pixels, png_declaring
from tests.helpers import tar_bytes


def _members(path: str) -> dict[str, bytes]:
    with tarfile.open(path) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive.getmembers()}


def _good_shards(root: Path) -> list[Path]:
    """Three shards: JPEG, PNG, grayscale and palette images with metadata members."""
    shards = []
    for s in range(3):
        members = []
        for i in range(3):
            n = 1 + 3 * s + i
            key = f"s{s}/img{i:03d}"
            fmt, ext = ("JPEG", "jpg") if i == 0 else ("PNG", "png")
            mode = {0: "RGB", 1: "L", 2: "P"}[i] if s == 1 else "RGB"
            members += [
                (f"{key}.{ext}", encoded(kodak_pixels(n, (96, 128 - 16 * i)), fmt, mode)),
                (f"{key}.json", json.dumps({"n": n, "caption": "ü ✓"}).encode()),
                (f"{key}.cls", str(n).encode()),
            ]
        path = root / f"data-{s:06d}.tar"
        path.write_bytes(tar_bytes(members))
        shards.append(path)
    return shards


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, tiny_model_path, ray_local):
    """The job on Ray actors (an embedded Ray), as a cluster runs it."""
    root = tmp_path_factory.mktemp("archive")
    inputs = _good_shards(root / "in" if (root / "in").mkdir() is None else root)
    config = CompressConfig(inputs=(str(root / "in" / "data-{000000..000002}.tar"),), output=str(root / "out"),
                            model=str(tiny_model_path), batch_size=2, cluster=ClusterConfig(executor="ray"))
    return inputs, config, run_compress(config)


def test_compress_summary_and_layout(compressed):
    inputs, config, summary = compressed
    assert summary.complete and summary.shards == 3 and summary.samples == 9 and summary.ok == 9
    assert summary.bitstream_bytes < summary.image_bytes
    out = Path(config.output)
    assert (out / "CURRENT").read_text().strip() == "g0000"
    for shard in inputs:
        stem = shard.stem
        assert (out / "g0000" / "shards" / f"{stem}.tar").is_file()
        assert json.loads((out / "g0000" / "_commits" / f"{stem}.json").read_text())["samples"] == 3
    assert not list(out.rglob("*.partial*"))


def test_manifest_reconciles_with_inputs_and_outputs(compressed):
    inputs, config, summary = compressed
    table = read_manifest(f"{config.output}/g0000/manifest")
    rows = table.to_pylist()
    assert len({(r["source_url"], r["sample_index"]) for r in rows}) == len(rows) == 9
    for shard in inputs:
        original = _members(str(shard))
        output = _members(f"{config.output}/g0000/shards/{shard.stem}.tar")
        shard_rows = [r for r in rows if r["source_url"] == str(shard)]
        assert sorted(r["sample_index"] for r in shard_rows) == [0, 1, 2]
        for row in shard_rows:
            assert row["status"] == "ok" and row["error"] is None
            ncb = output[f"{row['key']}.ncb"]
            assert row["compressed_bytes"] == len(ncb)
            assert row["bpp"] == pytest.approx(8 * len(ncb) / (row["width"] * row["height"]))
            assert row["source_bytes"] == len(original[row["member"]])
            for name in row["carried_members"]:
                assert output[name] == original[name]  # metadata byte-identical
        expected = {n for n in original if not n.endswith((".jpg", ".png"))} | {f"{r['key']}.ncb" for r in shard_rows}
        assert set(output) == expected


def test_decompress_restores_images_and_members(compressed, tmp_path, tiny_model_path):
    inputs, config, _ = compressed
    summary = run_decompress(DecompressConfig(inputs=(config.output,), output=str(tmp_path / "restored"),
                                              model=str(tiny_model_path)))
    assert summary.complete and summary.ok == 9 and summary.errors == 0
    manifest = {(r["source_url"], r["sample_index"]): r for r in read_manifest(f"{config.output}/g0000/manifest").to_pylist()}
    for shard in inputs:
        original = _members(str(shard))
        restored = _members(str(tmp_path / "restored" / f"{shard.stem}.tar"))
        assert set(restored) == set(original)  # every member under its own name: .jpg stays .jpg
        for name, data in original.items():
            if name.endswith((".jpg", ".png")):
                source = Image.open(io.BytesIO(data))
                image = Image.open(io.BytesIO(restored[name]))
                assert image.format == source.format and image.size == source.size
                assert image.mode == {"P": "RGB"}.get(source.mode, source.mode)
                row = next(r for r in manifest.values() if r["member"] == name)
                reference = np.asarray(source.convert("RGB"), dtype=float)
                mse = np.mean((np.asarray(image.convert("RGB"), dtype=float) - reference) ** 2)
                if source.format == "PNG" and source.mode == "RGB":  # lossless: the manifest's PSNR is what users get
                    assert 10 * np.log10(255**2 / mse) == pytest.approx(row["psnr"], abs=0.05)
            else:
                assert restored[name] == data
    restore_rows = read_manifest(str(tmp_path / "restored" / "_restore_manifest"), RESTORE_SCHEMA)
    assert restore_rows.num_rows == 9 and pc.all(pc.equal(restore_rows["status"], "ok")).as_py()


def test_restored_shards_keep_webdataset_keys_and_extensions(compressed, tmp_path, tiny_model_path):
    """A pipeline reading ("jpg", "cls") from the originals reads the restored shards the same way."""
    import webdataset as wds

    inputs, config, _ = compressed
    run_decompress(DecompressConfig(inputs=(config.output,), output=str(tmp_path / "r"), model=str(tiny_model_path)))
    pairs = list(wds.WebDataset(str(tmp_path / "r" / f"{inputs[0].stem}.tar"), shardshuffle=False)
                 .select(lambda sample: "jpg" in sample).to_tuple("__key__", "jpg", "cls"))
    assert [(key, cls) for key, _, cls in pairs] == [("s0/img000", b"1")]
    assert Image.open(io.BytesIO(pairs[0][1])).format == "JPEG"


def test_decompress_to_directory_in_one_chosen_format(compressed, tmp_path, tiny_model_path):
    _, config, _ = compressed
    summary = run_decompress(DecompressConfig(inputs=(config.output,), output=str(tmp_path / "files"),
                                              model=str(tiny_model_path), to="directory", image_format="webp-lossless"))
    assert summary.ok == 9
    files = sorted(p.relative_to(tmp_path / "files").as_posix() for p in (tmp_path / "files").rglob("*.webp"))
    assert files[:3] == ["data-000000/s0/img000.webp", "data-000000/s0/img001.webp", "data-000000/s0/img002.webp"]
    assert Image.open(tmp_path / "files" / files[0]).format == "WEBP"


def test_the_in_process_executor_writes_what_the_ray_actors_wrote(compressed, tmp_path):
    """The same job with its worker in this process (``auto`` for a job of one local worker): the
    same bitstreams, members and manifest rows, bar the job's id and timings."""
    inputs, config, _ = compressed
    local = run_compress(CompressConfig(inputs=config.inputs, output=str(tmp_path / "out"), model=config.model,
                                        batch_size=2, cluster=ClusterConfig(executor="in-process")))
    assert local.complete and local.ok == 9
    for shard in inputs:
        assert _members(str(tmp_path / "out" / "g0000" / "shards" / f"{shard.stem}.tar")) == \
            _members(f"{config.output}/g0000/shards/{shard.stem}.tar")
    varying = {"job_id", "encode_seconds", "output_shard"}
    rows = [{k: v for k, v in row.items() if k not in varying}
            for row in read_manifest(str(tmp_path / "out" / "g0000" / "manifest")).to_pylist()]
    assert rows == [{k: v for k, v in row.items() if k not in varying}
                    for row in read_manifest(f"{config.output}/g0000/manifest").to_pylist()]


def test_rerun_skips_committed_shards_and_changes_nothing(compressed):
    _, config, _ = compressed
    out = Path(config.output)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name not in ("summary.json", "job.json")}
    again = run_compress(config)
    assert again.shards_skipped == 3 and again.samples == 9
    after = {p: p.read_bytes() for p in before}
    assert after == before


def test_another_configuration_over_the_same_output_is_refused(compressed, tmp_path):
    _, config, _ = compressed
    from tests.factories import train_tiny_codec

    other = train_tiny_codec(tmp_path, steps=1)
    with pytest.raises(ConfigError, match="--overwrite"):
        run_compress(CompressConfig(inputs=config.inputs, output=config.output, model=str(other)))


def test_bad_inputs_become_error_rows_and_the_job_completes(tmp_path, tiny_model_path):
    good = encoded(kodak_pixels(1, (64, 64)))
    rgba = np.dstack([kodak_pixels(2, (32, 32)), np.full((32, 32), 100, np.uint8)])
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    sixteen = io.BytesIO()
    Image.fromarray(np.full((16, 16), 40000, np.uint16)).save(sixteen, format="PNG")
    members = [
        ("ok1.png", good), ("ok1.json", b"{}"),
        ("corrupt.jpg", b"\xff\xd8\xff\xe0 definitely not a jpeg"), ("corrupt.txt", b"keep me"),
        ("halfpng.png", good[: len(good) // 2]),
        ("empty.png", b""),
        ("noimage.json", b'{"only": "metadata"}'),
        ("bomb.png", png_declaring(100_000, 100_000)),
        ("transparent.png", buffer.getvalue()),
        ("deep.png", sixteen.getvalue()),
        ("ok2.png", good),
    ]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "bad.tar").write_bytes(tar_bytes(members))
    truncated = tar_bytes([("t1.png", good), ("t2.png", good)])
    (tmp_path / "in" / "truncated.tar").write_bytes(truncated[: 8192 + 512 + 1000])  # inside t2.png's data
    (tmp_path / "in" / "notatar.tar").write_bytes(b"this is not a tar archive at all" * 40)
    summary = run_compress(CompressConfig(inputs=(str(tmp_path / "in"),), output=str(tmp_path / "out"),
                                          model=str(tiny_model_path)))
    assert summary.complete
    rows = {r["key"]: r for r in read_manifest(str(tmp_path / "out" / "g0000" / "manifest")).to_pylist()}
    expected_errors = {
        "corrupt": "not a readable image", "halfpng": "corrupt or truncated", "empty": "zero-byte",
        "noimage": "no image member", "bomb": "exceeds the limit", "transparent": "transparent",
        "deep": "16-bit", "t2": "truncated",
    }
    for key, message in expected_errors.items():
        assert rows[key]["status"] == "error" and message in rows[key]["error"], (key, rows[key]["error"])
        assert rows[key]["passthrough"]
    assert rows["ok1"]["status"] == rows["ok2"]["status"] == rows["t1"]["status"] == "ok"
    assert rows[""]["error"].startswith("shard unreadable")  # notatar.tar: one shard-level row
    output = _members(str(tmp_path / "out" / "g0000" / "shards" / "bad.tar"))
    assert output["corrupt.jpg"].startswith(b"\xff\xd8") and output["corrupt.txt"] == b"keep me"
    assert output["bomb.png"] == dict(members)["bomb.png"]


def test_decompress_without_the_archives_model_names_it(compressed, tmp_path):
    _, config, _ = compressed
    job = json.loads((Path(config.output) / "g0000" / "job.json").read_text())
    with pytest.raises(ConfigError, match=job["model"]["sha256"]):
        run_decompress(DecompressConfig(inputs=(config.output,), output=str(tmp_path / "r")))


def test_decompress_with_another_model_refuses_each_bitstream_and_keeps_it(compressed, tmp_path):
    from tests.factories import train_tiny_codec

    inputs, config, _ = compressed
    job = json.loads((Path(config.output) / "g0000" / "job.json").read_text())
    other = train_tiny_codec(tmp_path / "other", steps=1)
    summary = run_decompress(DecompressConfig(inputs=(config.output,), output=str(tmp_path / "r"), model=str(other)))
    assert summary.complete and summary.ok == 0 and summary.errors == 9
    rows = read_manifest(str(tmp_path / "r" / "_restore_manifest"), RESTORE_SCHEMA).to_pylist()
    assert all(f"sha256 {job['model']['sha256']}" in row["error"] for row in rows)
    restored = _members(str(tmp_path / "r" / f"{inputs[0].stem}.tar"))
    compressed_members = _members(f"{config.output}/g0000/shards/{inputs[0].stem}.tar")
    assert restored == compressed_members  # written through unchanged: nothing lost


def test_a_folder_of_jpegs_compresses_and_restores_to_jpegs(tmp_path, tiny_model_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    originals = {f"kodim{n:02d}.jpg": encoded(kodak_pixels(n, (64, 96)), "JPEG") for n in (1, 2, 3)}
    for name, data in originals.items():
        (photos / name).write_bytes(data)
    archive = str(tmp_path / "archive")
    summary = run_compress(CompressConfig(inputs=(str(photos),), output=archive, model=str(tiny_model_path)))
    assert summary.complete and summary.shards == 1 and summary.ok == 3
    assert summary.input_shard_bytes == sum(map(len, originals.values()))
    rows = read_manifest(f"{archive}/g0000/manifest").to_pylist()
    assert sorted(r["key"] for r in rows) == ["kodim01", "kodim02", "kodim03"]
    assert {r["source_url"] for r in rows} == {str(photos / "images-000000")}
    restored = tmp_path / "restored"
    run_decompress(DecompressConfig(inputs=(archive,), output=str(restored), model=str(tiny_model_path),
                                    to="directory"))
    files = sorted(p.name for p in (restored / "images-000000").iterdir())
    assert files == sorted(originals)
    assert all(Image.open(restored / "images-000000" / name).format == "JPEG" for name in files)
    (photos / "kodim00.jpg").write_bytes(originals["kodim01.jpg"])  # the folder changed: no silent resume
    with pytest.raises(ConfigError, match="--overwrite"):
        run_compress(CompressConfig(inputs=(str(photos),), output=archive, model=str(tiny_model_path)))


def test_one_image_file_is_a_shard_of_one_sample(tmp_path, tiny_model_path):
    image = tmp_path / "one.jpg"
    image.write_bytes(encoded(kodak_pixels(4, (64, 64)), "JPEG"))
    summary = run_compress(CompressConfig(inputs=(str(image),), output=str(tmp_path / "a"), model=str(tiny_model_path)))
    assert summary.complete and summary.samples == summary.ok == 1
    assert "(" in summary.text() and "nan" not in summary.text()
    assert set(_members(str(tmp_path / "a" / "g0000" / "shards" / "images-000000.tar"))) == {"one.ncb"}


def test_an_output_inside_the_input_is_refused_before_any_work(tmp_path, tiny_model_path):
    from ncpipe.io.urls import InputError

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(encoded(kodak_pixels(1, (32, 32)), "JPEG"))
    with pytest.raises(InputError, match="inside input"):
        run_compress(CompressConfig(inputs=(str(tmp_path / "in"),), output=str(tmp_path / "in" / "archive"),
                                    model=str(tiny_model_path)))
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == ["a.jpg"]
