"""A corpus of bad input, built here: every sample gets exactly one row with its error, and nothing
is written outside the output locations, by compress or by decompress ``--to directory``."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

from ncpipe.config import CompressConfig, DecompressConfig
from ncpipe.manifest import RESTORE_SCHEMA, read_manifest
from ncpipe.pipeline.compress import EMPTY_SHARD_ERROR
from ncpipe.pipeline.jobs import run_compress, run_decompress
from ncpipe.reliability.verify import VerifyOptions, verify_archive
from tests.factories import encoded, kodak_pixels, png_declaring
from tests.helpers import tar_bytes

NON_UTF8 = b"caf\xe9".decode("utf-8", "surrogateescape")  # a Latin-1 name: not valid UTF-8
PRINTED_NON_UTF8 = "caf\\xe9"  # how manifests print it


def _jpeg_declaring(width: int, height: int) -> bytes:
    """A small real JPEG whose SOF0 header claims ``width`` x ``height``."""
    data = bytearray(encoded(kodak_pixels(3, (32, 32)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def _webp_declaring(width: int, height: int) -> bytes:
    """A small real lossy WebP whose VP8 key-frame header claims ``width`` x ``height`` (14 bits each)."""
    data = bytearray(encoded(kodak_pixels(3, (32, 32)), "WEBP"))
    assert data[12:16] == b"VP8 " and data[23:26] == b"\x9d\x01\x2a"
    data[26:30] = width.to_bytes(2, "little") + height.to_bytes(2, "little")
    return bytes(data)


def _corpus(root: Path) -> dict[str, dict[str, str]]:
    """Writes the input shards; returns, per shard, each sample key's expected error (None: coded)."""
    good = encoded(kodak_pixels(1, (64, 64)))
    jpeg, webp = encoded(kodak_pixels(2, (64, 64)), "JPEG"), encoded(kodak_pixels(2, (64, 64)), "WEBP")
    absolute = str(root / "abs_escape")  # if it were ever written, the snapshot would see it
    members = [
        ("ok.png", good), ("ok.json", b"{}"),
        ("garbage.jpg", b"\xff\xd8\xff\xe0 not really a jpeg" * 3),
        ("trunc-jpg.jpg", jpeg[: len(jpeg) // 2]),
        ("trunc-png.png", good[: len(good) // 2]),
        ("badcrc.png", good[:60] + bytes(40) + good[100:]),
        ("trunc-webp.webp", webp[: len(webp) // 2]),
        ("bomb-png.png", png_declaring(100_000, 100_000)),
        ("bomb-jpg.jpg", _jpeg_declaring(60_000, 60_000)),
        ("bomb-webp.webp", _webp_declaring(16_383, 16_383)),
        ("../../escape.png", good), ("../../escape.json", b"{}"),
        (f"{absolute}.png", good),
        ("dup.png", good), ("dup.json", b'{"first": true}'),
        ("mid.png", good),
        ("dup.png", good), ("dup.json", b'{"second": true}'),
        (f"{NON_UTF8}.png", good),
    ]
    (root / "in").mkdir()
    (root / "in" / "corpus.tar").write_bytes(tar_bytes(members))
    (root / "in" / "zero-bytes.tar").write_bytes(b"")
    (root / "in" / "no-members.tar").write_bytes(tar_bytes([]))
    (root / "in" / "metadata-only.tar").write_bytes(tar_bytes([("m1.json", b"{}"), ("m1.txt", b"t"), ("m2.cls", b"3")]))
    return {
        "corpus.tar": {
            "ok": None, "garbage": "not a readable image",
            "trunc-jpg": ("corrupt or truncated JPEG", "not a readable image: Truncated"),
            "trunc-png": "corrupt or truncated PNG", "badcrc": "corrupt or truncated PNG",
            "trunc-webp": "not a readable image", "bomb-png": "exceeds the limit",
            "bomb-jpg": "exceeds the limit", "bomb-webp": "exceeds the limit",
            "../../escape": "unsafe member name '../../escape.png'", absolute: f"unsafe member name '{absolute}.png'",
            "dup": None, "mid": None, PRINTED_NON_UTF8: "member name is not UTF-8: 'caf\\xe9.png'",
        },
        "zero-bytes.tar": {"": "shard unreadable"},
        "no-members.tar": {"": EMPTY_SHARD_ERROR},
        "metadata-only.tar": {"m1": "no image member", "m2": "no image member"},
    }


def _snapshot(root: Path, skip: tuple[str, ...]) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in root.rglob("*") if p.relative_to(root).parts[0] not in skip
    }


def test_every_bad_input_is_one_error_row_and_nothing_escapes(tmp_path, tiny_model_path):
    expected = _corpus(tmp_path)
    before = _snapshot(tmp_path, skip=("out", "restored"))
    summary = run_compress(CompressConfig(inputs=(str(tmp_path / "in"),), output=str(tmp_path / "out"),
                                          model=str(tiny_model_path), batch_size=2))
    assert summary.complete

    rows = read_manifest(str(tmp_path / "out" / "g0000" / "manifest")).to_pylist()
    by_shard: dict[str, list[dict]] = {}
    for row in rows:
        by_shard.setdefault(Path(row["source_url"]).name, []).append(row)
    assert sorted(by_shard) == sorted(expected)
    for shard, shard_rows in by_shard.items():
        indexes = sorted(r["sample_index"] for r in shard_rows)
        assert indexes in ([-1], list(range(len(shard_rows)))), shard  # each input sample once
        for row in shard_rows:
            error = expected[shard][row["key"]]
            if row["key"] == "dup" and row["sample_index"] == 13:
                error = "duplicate key 'dup'"  # the later of the two
            if error is None:
                assert row["status"] == "ok", row
            else:
                alternatives = error if isinstance(error, tuple) else (error,)
                assert row["status"] == "error" and any(e in row["error"] for e in alternatives), (error, row)
                assert row["passthrough"] or row["sample_index"] == -1
    assert len(by_shard["corpus.tar"]) == 15
    report = verify_archive(str(tmp_path / "out"), model=str(tiny_model_path), options=VerifyOptions(threads=1))
    assert report.ok, report.text()

    restored = run_decompress(DecompressConfig(inputs=(str(tmp_path / "out"),), output=str(tmp_path / "restored"),
                                               model=str(tiny_model_path), to="directory"))
    assert restored.complete
    restore_rows = read_manifest(str(tmp_path / "restored" / "_restore_manifest"), RESTORE_SCHEMA).to_pylist()
    corpus_restore = [r for r in restore_rows if r["source_url"].endswith("/corpus.tar")]
    assert sorted(r["sample_index"] for r in corpus_restore) == list(range(15))  # each sample once
    refused = {r["key"] for r in corpus_restore if r["error"] and "escape the output directory" in r["error"]}
    assert refused == {"../../escape", str(tmp_path / "abs_escape")}
    out = tmp_path / "restored" / "corpus"
    assert (out / "ok.png").read_bytes().startswith(b"\x89PNG") and (out / "ok.json").read_bytes() == b"{}"
    assert (out / f"{NON_UTF8}.png").is_file()  # the name's original bytes
    # Two samples with one key: the second to reach the directory must not overwrite the first
    # (the output shard holds the passthrough copy before the coded one: either may come first;
    # restore rows are in the order the samples were written).
    dups = [r for r in corpus_restore if r["key"] == "dup"]
    assert ["already written" in (r["error"] or "") for r in dups] == [False, True]
    assert (out / "dup.json").read_bytes() in (b'{"first": true}', b'{"second": true}')

    assert _snapshot(tmp_path, skip=("out", "restored")) == before  # nothing outside the outputs
    assert not [p for p in tmp_path.rglob("*") if ".partial" in p.name]


def test_a_tar_member_with_a_device_or_link_type_is_refused(tmp_path, tiny_model_path):
    link = tarfile.TarInfo("k.png")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        archive.addfile(link)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "links.tar").write_bytes(buffer.getvalue())
    run_compress(CompressConfig(inputs=(str(tmp_path / "in"),), output=str(tmp_path / "out"),
                                model=str(tiny_model_path)))
    (row,) = read_manifest(str(tmp_path / "out" / "g0000" / "manifest")).to_pylist()
    assert row["status"] == "error" and "unsupported tar member type" in row["error"]
    with tarfile.open(tmp_path / "out" / "g0000" / "shards" / "links.tar") as archive:
        assert archive.getmembers() == []  # the link is not carried either

