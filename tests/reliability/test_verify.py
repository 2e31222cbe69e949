"""``ncpipe verify``: a good archive passes; each kind of damage is reported where it is."""

from __future__ import annotations

import json
import shutil
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from ncpipe import bitstream as fmt
from ncpipe.cli import main
from ncpipe.codec import LearnedCodec
from ncpipe.config import CompressConfig
from ncpipe.models.checkpoint import load_codec_model
from ncpipe.pipeline.jobs import run_compress
from ncpipe.reliability.verify import (
    EXTENSIONS_CHUNK,
    HEADER_CHUNK,
    VerifyOptions,
    check_bitstream,
    verify_archive,
)
from tests.factories import encoded, kodak_pixels
from tests.helpers import member_offsets, tar_bytes

CHUNK_CHANNELS = 8  # the tiny model has 24 latent channels: chunks 1..3 hold 8 each


@pytest.fixture(scope="module")
def archive(tmp_path_factory, tiny_model_path) -> Path:
    """An archive of three shards: all coded; one error row among coded ones; an unreadable shard."""
    root = tmp_path_factory.mktemp("verify")
    (root / "in").mkdir()
    for s in range(2):
        members = []
        for i in range(3):
            key = f"s{s}/img{i}"
            members += [(f"{key}.png", encoded(kodak_pixels(1 + 3 * s + i, (64, 96)))), (f"{key}.json", b"{}")]
        if s == 1:
            members += [("s1/broken.jpg", b"\xff\xd8\xff not a jpeg"), ("s1/broken.txt", b"kept")]
        (root / "in" / f"d-{s}.tar").write_bytes(tar_bytes(members))
    (root / "in" / "d-2.tar").write_bytes(b"not a tar" * 100)
    summary = run_compress(CompressConfig(inputs=(str(root / "in"),), output=str(root / "out"),
                                          model=str(tiny_model_path), batch_size=2,
                                          y_chunk_channels=CHUNK_CHANNELS))
    assert summary.complete and summary.samples == 8 and summary.ok == 6
    return root / "out"


@pytest.fixture
def copy(archive, tmp_path) -> Path:
    """A private copy of the archive to damage."""
    return Path(shutil.copytree(archive, tmp_path / "archive"))


def _verify(path: Path, model: Path, **options):
    return verify_archive(str(path), model=str(model), options=VerifyOptions(threads=2, **options))


def _ncb(archive: Path, shard: str, key: str) -> tuple[Path, int, bytes]:
    """(tar path, offset of the member's data in the tar, the member's bytes)."""
    path = archive / "g0000" / "shards" / f"{shard}.tar"
    data = path.read_bytes()
    for name, _, offset, size in member_offsets(data):
        if name == f"{key}.ncb":
            return path, offset, data[offset : offset + size]
    raise AssertionError(f"{key}.ncb not in {path}")


def _chunk_payload_offset(bitstream: bytes, chunk: int) -> int:
    """Offset of chunk ``chunk``'s payload inside the bitstream (layout: docs/bitstream.md)."""
    offset = fmt.HEADER_SIZE
    for _ in range(chunk):
        offset += 4 + struct.unpack_from("<I", bitstream, offset)[0] + 4
    return offset + 4


def _rewrite_tar(path: Path, change) -> None:
    """Rewrite a tar member by member through ``change(name, data) -> [(name, data), ...]``."""
    with tarfile.open(path) as archive:
        members = [(m.name, archive.extractfile(m).read()) for m in archive.getmembers()]
    path.write_bytes(tar_bytes([out for name, data in members for out in change(name, data)]))


def test_a_good_archive_verifies(archive, tiny_model_path, capsys):
    report = _verify(archive, tiny_model_path, full=True)
    assert report.ok, report.text()
    assert (report.shards, report.rows, report.bitstreams, report.bitstreams_ok) == (3, 8, 6, 6)
    assert main(["verify", str(archive), "--model", str(tiny_model_path), "--threads", "2"]) == 0
    assert "result      OK" in capsys.readouterr().out


def test_the_entropy_decode_gives_the_codecs_latents(archive, tiny_model_path):
    codec = LearnedCodec(load_codec_model(tiny_model_path), CHUNK_CHANNELS, 1)
    _, _, data = _ncb(archive, "d-0", "s0/img1")
    check = check_bitstream(data, codec)
    _, symbols = codec.decode_symbols(data)
    assert not check.damage
    np.testing.assert_array_equal(check.symbols.z, symbols.z)
    np.testing.assert_array_equal(check.symbols.y, symbols.y)
    codec.close()


def test_version_2_extensions_are_checked_too(archive, tiny_model_path):
    codec = LearnedCodec(load_codec_model(tiny_model_path), CHUNK_CHANNELS, 1)
    parsed = fmt.parse(_ncb(archive, "d-0", "s0/img1")[2])
    coefficients = fmt.CorrectionCoefficients.quantize("ab" * 32, seed=7, bits=4, values=[0.1, 0.5, 0.9])
    data = fmt.pack(fmt.Bitstream(parsed.header, parsed.z_stream, parsed.y_streams, (coefficients.to_extension(),)))
    assert fmt.parse_header(data).version == 2
    assert check_bitstream(data, codec).damage == () and check_bitstream(data, codec).symbols is not None
    damaged = data[:-6] + bytes([data[-6] ^ 1]) + data[-5:]
    (problem,) = check_bitstream(damaged, codec).damage
    assert problem[0] == EXTENSIONS_CHUNK and "CRC32 mismatch in extension 0" in problem[1]
    codec.close()


@pytest.mark.parametrize("chunk", [0, 2, 3])
def test_one_flipped_byte_is_reported_for_exactly_that_key_and_chunk(copy, tiny_model_path, chunk, capsys):
    path, offset, data = _ncb(copy, "d-1", "s1/img2")
    position = _chunk_payload_offset(data, chunk) + 5
    raw = bytearray(path.read_bytes())
    raw[offset + position] ^= 0x04  # bit rot inside the stored tar
    path.write_bytes(bytes(raw))
    damaged = bytes(raw[offset : offset + len(data)])
    name = fmt._chunk_name(fmt.parse_header(damaged), chunk)
    with pytest.raises(fmt.BitstreamError, match=f"CRC32 mismatch in {name}".replace("(", r"\(").replace(")", r"\)")):
        fmt.parse(damaged)  # the reference parser names the same chunk

    report = _verify(copy, tiny_model_path)
    assert {(p.where, p.key) for p in report.problems} == {("d-1", "s1/img2")}
    crc = [p for p in report.problems if "CRC32" in p.message]
    assert [p.chunk for p in crc] == [name]
    if chunk == 0:  # the y chunks' tables come from z: they are reported as not decodable
        assert {p.chunk for p in report.problems} == {fmt._chunk_name(fmt.parse_header(damaged), i) for i in range(4)}
    else:
        assert len(report.problems) == 1
    assert report.bitstreams_ok == 5
    assert main(["verify", str(copy), "--model", str(tiny_model_path)]) == 1
    assert f"d-1: key 's1/img2': {name}: CRC32 mismatch" in capsys.readouterr().out


def test_a_damaged_header_is_reported_as_the_header(copy, tiny_model_path):
    path, offset, _ = _ncb(copy, "d-0", "s0/img0")
    raw = bytearray(path.read_bytes())
    raw[offset + 20] ^= 0xFF  # inside the model SHA-256
    path.write_bytes(bytes(raw))
    (problem,) = _verify(copy, tiny_model_path).problems
    assert (problem.key, problem.chunk) == ("s0/img0", HEADER_CHUNK) and "header CRC32" in problem.message


def test_damage_behind_a_valid_crc_is_caught_by_the_coders_end_state(copy, tiny_model_path):
    path, offset, data = _ncb(copy, "d-0", "s0/img2")
    start = _chunk_payload_offset(data, 1)
    length = struct.unpack_from("<I", data, start - 4)[0]
    payload = bytearray(data[start : start + length])
    payload[4] ^= 0x01  # the first rANS word (the coder state), not the escape area
    forged = data[:start] + bytes(payload) + struct.pack("<I", zlib.crc32(payload)) + data[start + length + 4 :]
    _rewrite_tar(path, lambda name, d: [(name, forged if name == "s0/img2.ncb" else d)])
    (problem,) = _verify(copy, tiny_model_path).problems
    assert problem.key == "s0/img2" and problem.chunk.startswith("chunk 1 ")
    assert "rANS decode failed" in problem.message


def test_deleted_and_extra_members_are_reported(copy, tiny_model_path):
    shard = copy / "g0000" / "shards" / "d-0.tar"

    def change(name, data):
        if name == "s0/img1.ncb":
            return []  # deleted
        if name == "s0/img2.json":
            return [(name, data), ("s0/stowaway.bin", b"x")]  # an extra member
        return [(name, data)]

    _rewrite_tar(shard, change)
    problems = {(p.key, p.message) for p in _verify(copy, tiny_model_path).problems}
    assert problems == {
        ("s0/img1", "member s0/img1.ncb is in the manifest but missing from the shard"),
        ("s0/stowaway", "member s0/stowaway.bin is in the shard but not in the manifest"),
    }


def test_manifest_rows_that_do_not_match_the_shard_are_reported(copy, tiny_model_path):
    part = copy / "g0000" / "manifest" / "d-1.parquet"
    table = pq.read_table(part)
    rows = {row["key"]: row for row in table.to_pylist()}
    rows["s1/img0"]["compressed_bytes"] += 1
    del rows["s1/img1"]  # a row lost: its sample index and members are unaccounted for
    rows = list(rows.values())
    pq.write_table(table.from_pylist(rows, schema=table.schema), part)
    texts = [p.text() for p in _verify(copy, tiny_model_path).problems]
    assert any("key 's1/img0'" in t and "manifest compressed_bytes says" in t for t in texts), texts
    assert any("sample indexes are not 0..2: missing [1]" in t for t in texts), texts
    assert any("commit marker says samples=4" in t for t in texts), texts
    assert any("s1/img1.ncb is in the shard but not in the manifest" in t for t in texts), texts
    assert any("summary.json says samples=8, the shards hold 7" in t for t in texts), texts


def test_uncommitted_shards_and_stray_temporaries_are_reported(copy, tiny_model_path):
    (copy / "g0000" / "_commits" / "d-1.json").unlink()
    (copy / "g0000" / "shards" / ".d-9.tar.partial-123-0").write_bytes(b"half a shard")
    texts = [p.text() for p in _verify(copy, tiny_model_path).problems]
    assert any(t.startswith("d-1: not committed") for t in texts), texts
    assert any("stray temporary file shards/.d-9.tar.partial-123-0" in t for t in texts), texts
    assert any("summary.json says shards=3, the shards hold 2" in t for t in texts), texts


def test_a_missing_model_is_a_problem_not_a_pass(archive, capsys):
    report = verify_archive(str(archive), options=VerifyOptions(threads=1))
    assert not report.ok and report.bitstreams_ok == 0
    assert "not available here" in report.problems[0].message
    assert main(["verify", str(archive)]) == 1


def test_json_report_and_not_an_archive(archive, tiny_model_path, tmp_path, capsys, caplog):
    assert main(["verify", str(archive), "--model", str(tiny_model_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    assert main(["verify", str(tmp_path)]) == 2
    assert "not an ncpipe archive" in caplog.text


def test_a_malformed_corrdiff_extension_is_refused_as_decoding_refuses_it(archive, tiny_model_path):
    from ncpipe.diffusion.corrdiff import read_corrections

    codec = LearnedCodec(load_codec_model(tiny_model_path), CHUNK_CHANNELS, 1)
    parsed = fmt.parse(_ncb(archive, "d-0", "s0/img1")[2])
    coefficients = fmt.CorrectionCoefficients.quantize("ab" * 32, seed=7, bits=4, values=[0.1, 0.5, 0.9])
    data = bytearray(fmt.pack(fmt.Bitstream(parsed.header, parsed.z_stream, parsed.y_streams,
                                            (coefficients.to_extension(),))))
    payload_end = len(data) - 4  # the extension's CRC32 follows its payload
    head = payload_end - 2 - 38 - 5  # kind, length; then 38 bytes of CorrDiff header, 2 of coefficients
    data[head + 5 + 36] = 0  # steps K = 0: no coefficient to read; the CRC32 recomputed so only that is wrong
    data[payload_end:] = struct.pack("<I", zlib.crc32(bytes(data[head:payload_end])))
    with pytest.raises(fmt.BitstreamError, match="declares 0 steps"):
        read_corrections(bytes(data))  # what --decoder corrdiff does with it
    (problem,) = check_bitstream(bytes(data), codec).damage
    assert problem[0] == EXTENSIONS_CHUNK and "declares 0 steps" in problem[1]
    codec.close()
