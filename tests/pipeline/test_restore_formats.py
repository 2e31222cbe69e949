"""How a restore names and encodes each image: as the archive's manifest says its source was."""

import io

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ncpipe.images import ImageMetadata
from ncpipe.pipeline.decompress import RestoreFormats, source_formats
from tests.factories import kodak_pixels


def _part(path, **columns) -> str:
    pq.write_table(pa.table(columns), path)
    return str(path)


def test_sources_come_from_the_coded_rows_of_the_manifest_part(tmp_path):
    part = _part(tmp_path / "m.parquet", key=["a", "s/b", "c", "d"], member=["a.JPG", "s/b.tiff", "c.png", None],
                 source_format=["JPEG", "TIFF", "PNG", None], status=["ok", "ok", "error", "error"])
    assert source_formats(part) == {"a": ("JPG", "JPEG"), "s/b": ("tiff", "TIFF")}
    assert source_formats(str(tmp_path / "missing.parquet")) == {} == source_formats(None)
    assert source_formats(_part(tmp_path / "r.parquet", key=["a"], status=["ok"])) == {}  # a restore manifest


def test_each_choice_names_and_encodes_the_image():
    sources = {"a": ("JPG", "JPEG"), "m": ("jpg", "MPO"), "w": ("webp", "WEBP")}
    original = RestoreFormats("original", 90, sources)
    assert original.target("a") == ("JPG", "JPEG", False) and original.target("m") == ("jpg", "JPEG", False)
    assert original.target("unknown") == ("png", "PNG", False)
    assert RestoreFormats("png", 90, sources).target("a") == ("png", "PNG", False)
    assert RestoreFormats("webp-lossless", 90, sources).target("a") == ("webp", "WEBP", True)
    image = Image.fromarray(kodak_pixels(2, (48, 64)))
    for key, formats in (("a", original), ("w", original), ("a", RestoreFormats("webp-lossless", 90, sources))):
        target = formats.target(key)
        assert Image.open(io.BytesIO(formats.encode(image, target, ImageMetadata()))).format == target[1]
    low = RestoreFormats("original", 20, sources)
    assert len(low.encode(image, low.target("a"), ImageMetadata())) < len(original.encode(image, ("JPG", "JPEG", False),
                                                                                           ImageMetadata()))
