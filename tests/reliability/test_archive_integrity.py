"""Everything an archive holds is checksummed, and a restore reads the committed set.

Real tar shards, real Parquet parts, real ``decompress`` (its shard workers in this process): a
changed byte in a carried member or in an image stored unchanged is found by ``verify`` and refused
by ``decompress``; a deleted or uncommitted shard is an error row for each sample it should hold;
damage in a tar after a sample costs only the samples it touches.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ncpipe.cli import main
from ncpipe.cli.exit_status import EXIT_SAMPLE_ERRORS
from ncpipe.config import CompressConfig
from ncpipe.manifest import RESTORE_SCHEMA, read_manifest
from ncpipe.pipeline.jobs import run_compress
from ncpipe.reliability.verify import VerifyOptions, verify_archive
from tests.factories import encoded, kodak_pixels
from tests.helpers import member_offsets, tar_bytes

BLOCK = 512  # a tar block


def _png16() -> bytes:
    """A 16-bit grayscale PNG: ncpipe cannot code it, so it is stored unchanged."""
    buffer = io.BytesIO()
    Image.fromarray(np.arange(32 * 48, dtype=np.uint16).reshape(32, 48) * 40).save(buffer, "PNG")
    return buffer.getvalue()


def _inputs(root: Path) -> dict[str, bytes]:
    """Two input shards of three samples each (an image, a .cls, a .json); shard 0's last image is
    16-bit. Returns every input member by name."""
    members: dict[str, bytes] = {}
    for s in range(2):
        shard = []
        for i in range(3):
            key = f"s{s}/img{i}"
            image = _png16() if (s, i) == (0, 2) else encoded(kodak_pixels(1 + 3 * s + i, (64, 64)))
            shard += [(f"{key}.png", image), (f"{key}.cls", f"{i}".encode()), (f"{key}.json", b'{"i": %d}' % i)]
        members.update(shard)
        (root / f"d-{s}.tar").write_bytes(tar_bytes(shard))
    return members


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_path) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("integrity")
    (root / "in").mkdir()
    members = _inputs(root / "in")
    summary = run_compress(CompressConfig(inputs=(str(root / "in"),), output=str(root / "out"),
                                          model=str(tiny_model_path), batch_size=2, metrics=False))
    assert summary.complete and summary.samples == 6 and summary.ok == 5
    return root / "out", members


@pytest.fixture
def archive(built, tmp_path) -> Path:
    """A private copy of the archive to damage."""
    return Path(shutil.copytree(built[0], tmp_path / "archive"))


def _shard(archive: Path, stem: str) -> Path:
    return archive / "g0000" / "shards" / f"{stem}.tar"


def _flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x20
    path.write_bytes(bytes(raw))


def _member(path: Path, name: str) -> tuple[int, int, int]:
    """(header offset, data offset, size) of member ``name`` in the tar at ``path``."""
    return next((h, d, n) for m, h, d, n in member_offsets(path.read_bytes()) if m == name)


def _restore(archive: Path, out: Path, model: Path, **options) -> tuple[int, dict[str, dict]]:
    """``ncpipe decompress`` (exit status) and its restore rows by key."""
    status = main(["decompress", str(archive), "-o", str(out), "--model", str(model), "--to", "directory"])
    rows = read_manifest(str(out / "_restore_manifest"), RESTORE_SCHEMA).to_pylist()
    return status, {row["key"]: row for row in rows}


# -- checksums -------------------------------------------------------------------------


def test_every_carried_member_and_stored_original_has_its_digest(built):
    archive, members = built
    rows = read_manifest(str(archive / "g0000" / "manifest")).to_pylist()
    digests = {name: digest for row in rows for name, digest in zip(row["carried_members"], row["carried_sha256"])}
    assert digests == {name: hashlib.sha256(data).hexdigest() for name, data in members.items()
                       if not name.endswith(".png") or name == "s0/img2.png"}  # the 16-bit PNG is carried
    marker = json.loads((archive / "g0000" / "_commits" / "d-0.json").read_bytes())
    assert marker["carried_members"] == 7  # 3 x (.cls, .json) + the stored PNG


@pytest.mark.parametrize("name", ["s0/img1.cls", "s0/img2.png"], ids=["carried member", "stored original"])
def test_a_changed_byte_is_found_by_verify_and_refused_by_decompress(archive, tiny_model_path, tmp_path, name,
                                                                     capsys):
    path = _shard(archive, "d-0")
    _, offset, size = _member(path, name)
    _flip(path, offset + size // 2)  # same size: the tar itself stays valid
    key = name.rsplit(".", 1)[0]

    report = verify_archive(str(archive), model=str(tiny_model_path), options=VerifyOptions(threads=1))
    assert [(p.where, p.key) for p in report.problems] == [("d-0", key)]
    assert f"member {name}: its SHA-256 is not the manifest's" in report.problems[0].message
    assert report.digests_checked == 13  # every carried member of both shards

    status, rows = _restore(archive, tmp_path / "restored", tiny_model_path)
    assert status == EXIT_SAMPLE_ERRORS
    assert rows[key]["status"] == "error" and f"member {name}: SHA-256 does not match" in rows[key]["error"]
    assert not (tmp_path / "restored" / "d-0" / name).exists()  # the damaged bytes are not handed back
    assert sorted(k for k, row in rows.items() if row["status"] == "error") == sorted({key, "s0/img2"})
    assert (tmp_path / "restored" / "d-0" / f"{key}.json").is_file()  # the rest of the sample is
    capsys.readouterr()


def test_a_digest_edited_in_the_manifest_no_longer_matches_the_commit_marker(archive, tiny_model_path):
    part = archive / "g0000" / "manifest" / "d-1.parquet"
    table = pq.read_table(part)
    rows = table.to_pylist()
    rows[0]["carried_sha256"][0] = "0" * 64
    pq.write_table(table.from_pylist(rows, schema=table.schema), part)
    texts = [p.text() for p in verify_archive(str(archive), model=str(tiny_model_path),
                                              options=VerifyOptions(threads=1)).problems]
    assert any("commit marker says carried_sha256=" in t for t in texts), texts
    assert any("its SHA-256 is not the manifest's" in t for t in texts), texts


def test_a_manifest_from_before_digests_still_reads(archive, tiny_model_path, tmp_path):
    for part in (archive / "g0000" / "manifest").glob("*.parquet"):
        table = pq.read_table(part)
        pq.write_table(table.drop(["carried_sha256"]).replace_schema_metadata(table.schema.metadata), part)
    for marker in (archive / "g0000" / "_commits").glob("*.json"):
        fields = json.loads(marker.read_bytes())
        del fields["carried_members"], fields["carried_sha256"]
        marker.write_text(json.dumps(fields))
    report = verify_archive(str(archive), model=str(tiny_model_path), options=VerifyOptions(threads=1))
    assert report.ok, report.text()
    assert (report.digests_checked, report.undigested) == (0, 13)
    status, rows = _restore(archive, tmp_path / "restored", tiny_model_path)
    assert [rows[k]["status"] for k in sorted(rows)] == ["ok", "ok", "error", "ok", "ok", "ok"]  # s0/img2: 16-bit
    assert status == EXIT_SAMPLE_ERRORS


# -- the committed set -----------------------------------------------------------------


def test_a_deleted_committed_shard_is_an_error_for_each_of_its_samples(archive, tiny_model_path, tmp_path):
    _shard(archive, "d-1").unlink()
    status, rows = _restore(archive, tmp_path / "restored", tiny_model_path)
    assert status == EXIT_SAMPLE_ERRORS
    assert sorted(rows) == [f"s{s}/img{i}" for s in range(2) for i in range(3)]
    for i in range(3):
        row = rows[f"s1/img{i}"]
        assert row["status"] == "error" and "shard unreadable" in row["error"] and row["sample_index"] == i


def test_an_uncommitted_shard_is_not_restored_and_each_sample_is_an_error(archive, tiny_model_path, tmp_path):
    (archive / "g0000" / "_commits" / "d-1.json").unlink()
    status, rows = _restore(archive, tmp_path / "restored", tiny_model_path)
    assert status == EXIT_SAMPLE_ERRORS
    assert {rows[f"s1/img{i}"]["error"] for i in range(3)} == {
        "shard unreadable: the archive has no commit marker for it (its job did not finish it)"}
    assert not (tmp_path / "restored" / "d-1").exists()
    assert [rows[f"s0/img{i}"]["status"] for i in range(2)] == ["ok", "ok"]


# -- damage in a tar after intact samples ------------------------------------------------


def _samples(path: Path) -> list[list[tuple[int, int, int]]]:
    """(header offset, data offset, size) of each member, grouped by sample in tar order."""
    groups: dict[str, list] = {}
    for name, header, offset, size in member_offsets(path.read_bytes()):
        groups.setdefault(name.split(".")[0], []).append((header, offset, size))
    return list(groups.values())


def _end(member: tuple[int, int, int]) -> int:
    """Offset just after a member's data, padded to whole blocks."""
    return member[1] + -(-member[2] // BLOCK) * BLOCK


def _damage(path: Path, how: str) -> None:
    """Damage the tar at ``path`` after its second-to-last sample (``lost``: its last sample goes too)
    or after its last one."""
    data, samples = path.read_bytes(), _samples(path)
    if how == "flipped byte in the end blocks":
        _flip(path, _end(samples[-1][-1]) + 100)
    elif how == "truncated at a block boundary":
        path.write_bytes(data[: _end(samples[-1][-1])])
    elif how == "truncated after a sample (lost)":
        path.write_bytes(data[: _end(samples[-2][-1])])
    elif how == "damaged header of a later member (lost)":
        _flip(path, samples[-1][0][0] + 130)  # inside the size field: the header checksum fails


@pytest.mark.parametrize("how", ["flipped byte in the end blocks", "truncated at a block boundary",
                                 "truncated after a sample (lost)", "damaged header of a later member (lost)"])
def test_an_intact_sample_is_restored_when_the_tar_is_damaged_after_it(archive, tiny_model_path, tmp_path, how):
    path = _shard(archive, "d-1")
    order = [name.split(".")[0] for name, *_ in member_offsets(path.read_bytes())][::3]  # keys in tar order
    _damage(path, how)
    lost = order[-1:] if "(lost)" in how else []
    status, rows = _restore(archive, tmp_path / "restored", tiny_model_path)
    assert sorted(rows) == [f"s{s}/img{i}" for s in range(2) for i in range(3)]  # every sample, once
    errors = sorted(key for key, row in rows.items() if row["status"] == "error")
    assert errors == sorted(["s0/img2", *lost])  # s0/img2: the 16-bit PNG, stored unchanged
    for key in set(order) - set(lost):
        assert (tmp_path / "restored" / "d-1" / f"{key}.png").read_bytes().startswith(b"\x89PNG")
    for key in lost:
        assert "not in the shard" in rows[key]["error"] and "damage" in rows[key]["error"]
    assert status == EXIT_SAMPLE_ERRORS


# -- the run summary -----------------------------------------------------------------------


def test_the_summary_bpp_is_all_bits_over_all_pixels(tmp_path, tiny_model_path):
    (tmp_path / "in").mkdir()
    members = [("tiny.png", encoded(kodak_pixels(1, (1, 1)))), ("big.png", encoded(kodak_pixels(2, (128, 128))))]
    (tmp_path / "in" / "d.tar").write_bytes(tar_bytes(members))
    summary = run_compress(CompressConfig(inputs=(str(tmp_path / "in"),), output=str(tmp_path / "out"),
                                          model=str(tiny_model_path), metrics=False))
    rows = read_manifest(str(tmp_path / "out" / "g0000" / "manifest")).to_pylist()
    bits, pixels = sum(8 * r["compressed_bytes"] for r in rows), sum(r["width"] * r["height"] for r in rows)
    assert summary.mean_bpp == pytest.approx(bits / pixels)
    assert summary.mean_bpp < max(r["bpp"] for r in rows) / 10  # the 1x1 image's hundreds of bpp do not dominate
