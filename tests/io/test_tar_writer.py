from __future__ import annotations

import hashlib
import io
import tarfile

import pytest

from ncpipe.io.tar_reader import ShardUnreadable, iter_samples
from ncpipe.io.tar_writer import TarShardWriter

LONG = "deep/" * 40 + "x" * 120 + ".seg.png"
NON_UTF8 = b"caf\xe9.jpg".decode("utf-8", "surrogateescape")
MEMBERS = [
    ("0001.jpg", b"\xff\xd8 jpeg"), ("0001.json", b'{"a": 1}'),
    ("0002.jpg", b""), ("0002.txt", "é ü 日本".encode()),
    (LONG, b"long name"), ("日本/0003.jpg", b"unicode dir"), (NON_UTF8, b"latin-1 name"),
]


def _write(members) -> bytes:
    buffer = io.BytesIO()
    with TarShardWriter(buffer) as writer:
        for name, data in members:
            writer.add(name, data)
    assert not buffer.closed
    return buffer.getvalue()


def test_same_members_give_identical_bytes():
    first = _write(MEMBERS)
    assert _write(MEMBERS) == first
    assert _write(MEMBERS[:-1]) != first
    assert hashlib.sha256(first).hexdigest() == hashlib.sha256(_write(list(MEMBERS))).hexdigest()


def test_headers_are_fixed_and_the_archive_is_complete():
    data = _write(MEMBERS)
    assert len(data) % tarfile.RECORDSIZE == 0 and data.endswith(b"\0" * 1024)
    with tarfile.open(fileobj=io.BytesIO(data), encoding="utf-8", errors="surrogateescape") as archive:
        infos = archive.getmembers()
        assert [(i.name, archive.extractfile(i).read()) for i in infos] == MEMBERS
    for info in infos:
        assert (info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode, info.type) == (
            0, 0, 0, "", "", 0o644, tarfile.REGTYPE)


def test_non_utf8_name_is_written_as_its_original_bytes():
    data = _write([(NON_UTF8, b"x")])
    assert b"caf\xe9.jpg" in data
    with tarfile.open(fileobj=io.BytesIO(data), encoding="latin-1") as archive:
        assert archive.getnames() == ["café.jpg"]


def test_round_trip_through_ncpipe_reader(tmp_path):
    path = tmp_path / "out.tar"
    path.write_bytes(_write(MEMBERS))
    samples = list(iter_samples(str(path)))
    assert [(m.name, m.data) for s in samples for m in s.members] == MEMBERS
    assert [s.key for s in samples] == ["0001", "0002", LONG.split(".")[0], "日本/0003", "caf\udce9"]
    assert [s.error for s in samples[:-1]] == [None] * 4


def test_round_trip_through_webdataset(tmp_path):
    import webdataset as wds  # imports torch: paid only by the tests that need it

    path = tmp_path / "out.tar"
    path.write_bytes(_write(MEMBERS[:6]))
    samples = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [(s["__key__"], s.get("jpg")) for s in samples] == [
        ("0001", b"\xff\xd8 jpeg"), ("0002", b""), (LONG.split(".")[0], None), ("日本/0003", b"unicode dir"),
    ]
    assert samples[2]["seg.png"] == b"long name" and samples[0]["json"] == b'{"a": 1}'


def test_add_after_close_fails_and_close_is_idempotent():
    writer = TarShardWriter(io.BytesIO())
    writer.close()
    writer.close()
    with pytest.raises(ValueError, match="closed"):
        writer.add("a.jpg", b"")


def test_a_failed_write_does_not_look_complete(tmp_path):
    buffer = io.BytesIO()
    with pytest.raises(RuntimeError):
        with TarShardWriter(buffer) as writer:
            writer.add("a.jpg", b"data")
            raise RuntimeError("boom")
    path = tmp_path / "failed.tar"
    path.write_bytes(buffer.getvalue())
    try:
        samples = list(iter_samples(str(path)))
    except ShardUnreadable:
        return
    assert samples[-1].error is not None
