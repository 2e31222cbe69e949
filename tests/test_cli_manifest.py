"""`ncpipe manifest` and ncpipe.api read the current generation only (a glob over every generation's
manifest counts recompressed samples twice); the API decodes one bitstream to a PIL image."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ncpipe.api import NotAnArchiveError, decode, open_archive
from ncpipe.cli import main
from ncpipe.manifest import LEGACY_COLUMNS, MANIFEST_SCHEMA, ManifestRow, read_manifest, write_manifest_part
from tests.factories import kodak_pixels
from tests.helpers import tar_bytes


@pytest.fixture(scope="module")
def two_generations(tmp_path_factory, tiny_codec) -> tuple[Path, list[np.ndarray], list[bytes]]:
    """An archive whose g0000 has 2 rows and whose current g0001 has 3, with real bitstreams in g0001."""
    root = tmp_path_factory.mktemp("generations") / "archive"
    images = [kodak_pixels(n, (64, 96)) for n in (1, 2, 3)]
    bitstreams = tiny_codec.encode_batch(images, ["RGB"] * 3)
    for generation, count in (("g0000", 2), ("g0001", 3)):
        rows = [ManifestRow("job", "in/a.tar", i, f"k{i}", compressed_bytes=len(bitstreams[i]), width=96, height=64,
                            rd_lambda=0.01, generation=generation) for i in range(count)]
        write_manifest_part(rows, str(root / generation / "manifest" / "a.parquet"), {"ncpipe_job_id": "job"})
        (root / generation / "job.json").write_text("{}")
        members = [(f"k{i}.ncb", bitstreams[i]) for i in range(count)] + [("k0.txt", b"meta")]
        (root / generation / "shards").mkdir()
        (root / generation / "shards" / "a.tar").write_bytes(tar_bytes(sorted(members)))
    (root / "CURRENT").write_text("g0001\n")
    return root, images, bitstreams


def test_manifest_command_reads_only_the_current_generation(two_generations, tmp_path, capsys):
    root, _, _ = two_generations
    assert len(read_manifest(str(root / "g0000" / "manifest"))) + 3 == 5  # what a glob over both would count
    assert main(["manifest", str(root), "-o", str(tmp_path / "m.parquet")]) == 0
    table = pq.read_table(tmp_path / "m.parquet")
    assert table.num_rows == 3 and set(table["generation"].to_pylist()) == {"g0001"}
    assert main(["manifest", str(root), "--columns", "key,compressed_bytes"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["key"] for r in rows] == ["k0", "k1", "k2"] and set(rows[0]) == {"key", "compressed_bytes"}
    assert main(["manifest", str(root), "--columns", "nope"]) == 2


def test_manifest_columns_carry_their_meaning_and_unit(tmp_path):
    field = MANIFEST_SCHEMA.field("compressed_bytes")
    assert field.metadata[b"unit"] == b"bytes" and b"container included" in field.metadata[b"description"]
    assert MANIFEST_SCHEMA.field("psnr").metadata[b"unit"] == b"dB"
    assert "rate" not in MANIFEST_SCHEMA.names and b"lambda" in MANIFEST_SCHEMA.field("rd_lambda").metadata[b"description"]
    url = str(tmp_path / "part.parquet")
    write_manifest_part([ManifestRow("job", "in/a.tar", 0, "k")], url, {})
    assert pq.read_schema(url).field("bpp").metadata[b"unit"] == b"bits per pixel"  # written into the file


def test_a_manifest_written_with_the_old_rate_column_still_reads(tmp_path):
    old = pa.table({"job_id": ["j"], "source_url": ["a.tar"], "sample_index": pa.array([0], pa.int32()),
                    "key": ["k"], LEGACY_COLUMNS["rd_lambda"]: [0.0067], "status": ["ok"], "passthrough": [False],
                    "carried_members": pa.array([[]], pa.list_(pa.string()))})
    (tmp_path / "m").mkdir()
    pq.write_table(old, tmp_path / "m" / "a.parquet")
    assert read_manifest(str(tmp_path / "m"))["rd_lambda"].to_pylist() == [0.0067]


def test_api_opens_iterates_and_decodes(two_generations, tiny_codec, tiny_model_path):
    root, images, bitstreams = two_generations
    archive = open_archive(str(root))
    assert archive.generation == "g0001" and archive.manifest().num_rows == 3
    samples = list(archive.samples())
    assert [s.key for s in samples] == ["k0", "k1", "k2"] and samples[0].members["txt"] == b"meta"
    image = samples[1].decode(model=str(tiny_model_path))
    _, expected = tiny_codec.decode(bitstreams[1])
    assert image.mode == "RGB" and image.size == (96, 64)
    assert np.array_equal(np.asarray(image), expected)
    assert np.array_equal(np.asarray(decode(bitstreams[2], model=str(tiny_model_path))),
                          tiny_codec.decode(bitstreams[2])[1])


def test_open_archive_of_a_folder_without_current_says_what_to_give(tmp_path):
    with pytest.raises(NotAnArchiveError, match="no ncpipe archive.*compress -o"):
        open_archive(str(tmp_path))


def test_importing_the_api_imports_no_torch():
    code = "import sys, ncpipe, ncpipe.api; print(','.join(m for m in ('torch', 'ray') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_manifest_schema_lists_units_without_an_archive(capsys):
    assert main(["manifest", "--schema"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "[bytes]" in lines["compressed_bytes"] and "[dB]" in lines["psnr"] and "lambda" in lines["rd_lambda"]
