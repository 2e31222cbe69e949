from __future__ import annotations

import tarfile
import tracemalloc
import zlib

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from hypothesis import given, settings
from hypothesis import strategies as st

from ncpipe.io.tar_reader import Sample, ShardUnreadable, TarMember, iter_samples
from tests.conftest import TEST_SECRET
from tests.helpers import member_offsets, put_bytes, special, tar_bytes

NORMAL = [
    ("a/0001.jpg", b"jpeg-1"), ("a/0001.json", b"{}"), ("a/0001.SEG.PNG", b"png"),
    ("a/0002.jpg", b"jpeg-2"), ("a/0002.cls", b""),
    ("b.c/0003.jpg", b"jpeg-3"),
    ("0004", b"no extension"),
]


def _summary(samples: list[Sample]) -> list[tuple[str, list[str], str | None]]:
    return [(s.key, [m.name for m in s.members], s.error) for s in samples]


def test_consecutive_members_with_one_key_make_a_sample(make_shard):
    url = make_shard([*NORMAL[:3], special("a/dir", tarfile.DIRTYPE), *NORMAL[3:]])
    samples = list(iter_samples(url))
    assert _summary(samples) == [
        ("a/0001", ["a/0001.jpg", "a/0001.json", "a/0001.SEG.PNG"], None),
        ("a/0002", ["a/0002.jpg", "a/0002.cls"], None),
        ("b.c/0003", ["b.c/0003.jpg"], None),
        ("0004", ["0004"], None),
    ]
    assert [s.index for s in samples] == [0, 1, 2, 3]
    assert {s.source_url for s in samples} == {url}
    assert [m.extension for m in samples[0].members] == ["jpg", "json", "seg.png"]
    assert samples[1].members[1] == TarMember("a/0002.cls", b"")  # zero bytes is a normal member
    assert samples[3].members[0].extension == ""
    assert samples[0].members[0].data == b"jpeg-1"


def test_keys_match_webdataset(make_shard):
    import webdataset as wds  # imports torch: paid only by the tests that need it

    url = make_shard(NORMAL[:-1])
    ours = [(s.key, sorted(m.extension for m in s.members)) for s in iter_samples(url)]
    dataset = wds.WebDataset(url, shardshuffle=False)
    theirs = [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in dataset]
    assert ours == theirs


def test_gzip_shard_reads_like_the_plain_one(make_shard):
    plain = make_shard(NORMAL, "plain.tar")
    gz = make_shard(NORMAL, "packed.tar.gz", compression="gz")
    assert _summary(list(iter_samples(gz))) == _summary(list(iter_samples(plain)))


def test_shard_on_s3(s3_bucket):
    url = f"{s3_bucket}/shards/data-000000.tar"
    put_bytes(url, tar_bytes(NORMAL))
    samples = list(iter_samples(url))
    assert [s.key for s in samples] == ["a/0001", "a/0002", "b.c/0003", "0004"]
    assert samples[2].members[0].data == b"jpeg-3" and samples[2].source_url == url


def _cut_points(data: bytes) -> dict[str, tuple[int, int]]:
    """Where to cut the NORMAL shard -> (cut offset, number of samples complete before the cut)."""
    offsets = {name: (header, start, size) for name, header, start, size in member_offsets(data)}
    end_of_members = max(start + size for _, start, size in offsets.values())
    return {
        "inside first data": (offsets["a/0001.jpg"][1] + 2, 0),
        "first sample's second header": (offsets["a/0001.json"][0] + 100, 0),
        "at a member boundary": (offsets["a/0002.jpg"][0], 0),
        "inside third sample's header": (offsets["b.c/0003.jpg"][0] + 300, 1),
        "inside last data": (offsets["0004"][1] + 3, 3),
        "before end marker": ((end_of_members + 511) // 512 * 512, 3),
    }


@pytest.mark.parametrize("where", list(_cut_points(tar_bytes(NORMAL))))
@pytest.mark.parametrize("compression", ["", "gz"])
def test_truncated_shard_keeps_what_came_before_and_flags_the_sample_in_progress(tmp_path, where, compression):
    data = tar_bytes(NORMAL)
    cut, complete = _cut_points(data)[where]
    whole = _summary(list(iter_samples(_write(tmp_path / "whole.tar", data))))
    truncated = _gzip_prefix(data, cut) if compression else data[:cut]
    samples = list(iter_samples(_write(tmp_path / f"cut.tar{'.gz' if compression else ''}", truncated)))
    assert _summary(samples[:complete]) == whole[:complete]
    broken = samples[complete:]
    assert len(broken) == 1 and broken[0].error.startswith("truncated or corrupt tar")
    assert broken[0].index == complete and broken[0].key == whole[complete][0]
    kept = [m.name for m in broken[0].members]  # the members read whole before the cut
    assert kept == whole[complete][1][: len(kept)]


def test_truncation_names_the_member(tmp_path):
    data = tar_bytes(NORMAL)
    _, _, start, _ = next(m for m in member_offsets(data) if m[0] == "a/0002.jpg")
    (sample_1, sample_2) = iter_samples(_write(tmp_path / "cut.tar", data[: start + 1]))
    assert sample_1.error is None
    assert sample_2.key == "a/0002" and sample_2.members == ()
    assert "'a/0002.jpg'" in sample_2.error and "unexpected end of data" in sample_2.error


def test_corrupt_header_mid_shard_is_an_error_not_the_end(tmp_path):
    data = bytearray(tar_bytes(NORMAL))
    header = next(m[1] for m in member_offsets(bytes(data)) if m[0] == "a/0002.jpg")
    data[header + 148: header + 156] = b"9999999\0"  # the checksum field
    samples = list(iter_samples(_write(tmp_path / "bad.tar", bytes(data))))
    assert _summary(samples)[0][:2] == ("a/0001", ["a/0001.jpg", "a/0001.json", "a/0001.SEG.PNG"])
    assert len(samples) == 1 and "bad header" in samples[0].error and "'a/0001.SEG.PNG'" in samples[0].error


def test_oversized_extended_header_is_refused_without_reading_it(tmp_path):
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size = tarfile.XHDTYPE, 1 << 30  # claims 1 GiB; the file is a few KiB
    data = tar_bytes([NORMAL[0]])[:1024] + pax.tobuf(tarfile.GNU_FORMAT) + b"\0" * 4096
    (sample,) = iter_samples(_write(tmp_path / "pax.tar", data))
    assert sample.key == "a/0001" and "extended header of 1073741824 bytes" in sample.error


@pytest.mark.parametrize("name", ["../x.jpg", "a/../../x.jpg", "/abs.jpg", ""])
def test_unsafe_names_are_errors_but_data_is_kept(make_shard, name):
    (sample, after) = iter_samples(make_shard([(name, b"evil"), ("z.jpg", b"ok")]))
    assert sample.members == (TarMember(name, b"evil"),)
    assert sample.error == f"unsafe member name '{name}'"
    assert after.error is None


def test_non_utf8_name_is_kept_as_its_bytes(make_shard):
    raw = b"caf\xe9.jpg"
    name = raw.decode("utf-8", "surrogateescape")
    (sample,) = iter_samples(make_shard([(name, b"latin-1 named")]))
    assert sample.members[0].name.encode("utf-8", "surrogateescape") == raw
    assert sample.error == r"member name is not UTF-8: 'caf\xe9.jpg'"
    sample.error.encode("utf-8")  # printable in logs and manifests


def test_non_consecutive_duplicate_key_flags_the_later_sample(make_shard):
    samples = list(iter_samples(make_shard([("k.jpg", b"1"), ("m.jpg", b"2"), ("k.json", b"3")])))
    assert [(s.key, s.error) for s in samples] == [
        ("k", None), ("m", None), ("k", "duplicate key 'k' (it appeared earlier in the shard)"),
    ]


def test_same_member_name_twice_in_a_sample(make_shard):
    (sample,) = iter_samples(make_shard([("k.jpg", b"1"), ("k.jpg", b"2")]))
    assert [m.data for m in sample.members] == [b"1", b"2"]
    assert sample.error == "member 'k.jpg' appears twice in the sample"


@settings(max_examples=100, deadline=None, derandomize=True)
@given(
    compression=st.sampled_from(["", "gz", "bz2"]),
    edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.binary(min_size=1, max_size=8)), max_size=3),
    keep=st.floats(0, 1),
)
def test_damaged_shards_raise_nothing_but_unreadable(compression, edits, keep):
    data = bytearray(tar_bytes([*NORMAL, ("l" * 150 + ".png", b"p" * 700)], compression))
    for where, patch in edits:
        at = int(where * len(data))
        data[at: at + len(patch)] = patch
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/fuzz/shard.tar", bytes(data[: int(keep * len(data))]))
    try:
        samples = list(iter_samples("memory:///fuzz/shard.tar"))
    except ShardUnreadable:
        return
    assert [s.index for s in samples] == list(range(len(samples)))


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE])
def test_links_and_devices_are_not_read(make_shard, kind):
    members = [("k.jpg", b"img"), special("k.txt", kind, linkname="/etc/passwd"), ("n.jpg", b"next")]
    (sample, after) = iter_samples(make_shard(members))
    assert [m.name for m in sample.members] == ["k.jpg"]
    assert sample.error == f"unsupported tar member type {kind!r} ('k.txt')"
    assert after.members == (TarMember("n.jpg", b"next"),) and after.error is None


def test_oversized_member_is_skipped_not_loaded(make_shard):
    big = 16 * 2**20
    url = make_shard([("k.json", b"{}"), ("k.jpg", b"\xff" * big), ("n.jpg", b"x" * 10)])
    tracemalloc.start()
    try:
        (sample, after) = iter_samples(url, max_member_bytes=10)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [m.name for m in sample.members] == ["k.json"]
    assert sample.error == f"member 'k.jpg' is {big} bytes, over the limit of 10 (not read)"
    assert after.members == (TarMember("n.jpg", b"x" * 10),) and after.error is None  # the limit is inclusive
    assert peak < big // 4


@pytest.mark.parametrize("content", [b"", b"definitely not a tar archive\n" * 100, b"\x1f\x8b\x08garbage"])
def test_a_file_that_is_no_tar_is_unreadable(tmp_path, content):
    url = _write(tmp_path / "junk.tar", content)
    with pytest.raises(ShardUnreadable, match="junk.tar"):
        list(iter_samples(url))


def test_missing_shard_is_unreadable_and_the_message_is_redacted(tmp_path):
    url = f"file://{tmp_path}/missing.tar?X-Amz-Signature={TEST_SECRET}"
    with pytest.raises(ShardUnreadable) as caught:
        list(iter_samples(url))
    assert "missing.tar" in str(caught.value) and TEST_SECRET not in str(caught.value)


def test_missing_shard_on_s3_does_not_leak_the_secret(s3_bucket):
    with pytest.raises(ShardUnreadable) as caught:
        list(iter_samples(f"{s3_bucket}/{TEST_SECRET}/missing.tar"))
    assert "missing.tar" in str(caught.value) and TEST_SECRET not in str(caught.value)


class _FlakyFileSystem(MemoryFileSystem):
    """Memory files whose reads fail with a connection reset past the first 2 KiB."""

    protocol = "flaky"
    store: dict = {}
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("flaky://"))

    def _open(self, path, mode="rb", **kwargs):
        handle = super()._open(path, mode, **kwargs)
        read = handle.read

        def failing_read(size=-1):
            if handle.tell() >= 2048:
                raise ConnectionResetError(f"peer reset while reading {TEST_SECRET}")
            return read(size if 0 <= size <= 2048 - handle.tell() else 2048 - handle.tell())

        handle.read = failing_read
        return handle


def test_a_storage_failure_mid_shard_raises_instead_of_faking_truncation(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", TEST_SECRET)
    fsspec.register_implementation("flaky", _FlakyFileSystem, clobber=True)
    _FlakyFileSystem().pipe_file("/shard.tar", tar_bytes(NORMAL))
    with pytest.raises(ConnectionError) as caught:
        list(iter_samples("flaky:///shard.tar"))
    assert "shard.tar" in str(caught.value) and TEST_SECRET not in str(caught.value)


def _write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _gzip_prefix(data: bytes, cut: int) -> bytes:
    """A gzip stream cut off right after it decompresses to ``data[:cut]``."""
    packer = zlib.compressobj(wbits=31)
    return packer.compress(data[:cut]) + packer.flush(zlib.Z_SYNC_FLUSH)
