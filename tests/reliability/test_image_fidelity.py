"""What an image carries is kept whole or the image is refused (and stored unchanged): several
frames, colour-key transparency; EXIF, ICC and XMP travel through the bitstream (format version 4)
into the restored PNG; bitstreams of versions 1-3 made before version 4 existed still decode."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageOps, PngImagePlugin

from ncpipe import bitstream as fmt
from ncpipe.codec import LearnedCodec
from ncpipe.config import CompressConfig, DecompressConfig
from ncpipe.images import ImageMetadata, ImageRefused, decode_image
from ncpipe.manifest import RESTORE_SCHEMA, read_manifest
from ncpipe.models.registry import load_model
from tests.factories import kodak_pixels
from tests.helpers import tar_bytes

FIXTURES = Path(__file__).parent / "fixtures"
XMP = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF/></x:xmpmeta>'
PORTRAIT_ORIENTATION = 6  # "rotate 90 CW to display": a phone held upright


def _save(image: Image.Image, fmt_name: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt_name, **options)
    return buffer.getvalue()


def _frames(count: int) -> list[Image.Image]:
    return [Image.fromarray(kodak_pixels(n + 1, (32, 48))) for n in range(count)]


def animated_webp() -> bytes:
    first, *rest = _frames(3)
    return _save(first, "WEBP", save_all=True, append_images=rest, duration=100, lossless=True)


def apng() -> bytes:
    first, *rest = _frames(2)
    return _save(first, "PNG", save_all=True, append_images=rest, duration=100)


def multipage_tiff() -> bytes:
    first, *rest = _frames(2)
    return _save(first, "TIFF", save_all=True, append_images=rest)


def colour_keyed_png(key_present: bool) -> bytes:
    pixels = kodak_pixels(4, (32, 32)).copy()
    key = (1, 2, 3)
    if key_present:
        pixels[5, 5] = key
    else:
        pixels[(pixels == key).all(axis=2)] = (1, 2, 4)
    return _save(Image.fromarray(pixels), "PNG", transparency=key)


def colour_keyed_gray_png() -> bytes:
    image = Image.fromarray(kodak_pixels(4, (32, 32))).convert("L")
    return _save(image, "PNG", transparency=int(np.asarray(image)[0, 0]))


def photo_with_metadata() -> tuple[bytes, ImageMetadata]:
    """A landscape-stored JPEG that displays as portrait (EXIF orientation 6), with an sRGB ICC profile and XMP."""
    exif = Image.Exif()
    exif[0x0112] = PORTRAIT_ORIENTATION
    exif[0x010F] = "ncpipe test camera"
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    data = _save(Image.fromarray(kodak_pixels(5, (48, 80))), "JPEG", quality=95, exif=exif.tobytes(),
                 icc_profile=icc, xmp=XMP)
    return data, ImageMetadata(exif.tobytes().removeprefix(b"Exif\x00\x00"), icc, XMP)


@pytest.mark.parametrize("make, frames", [(animated_webp, 3), (apng, 2), (multipage_tiff, 2)])
def test_multi_frame_images_are_refused_not_cut_to_frame_0(make, frames):
    with pytest.raises(ImageRefused, match=f"holds {frames} frames"):
        decode_image(make())


def test_colour_key_transparency_is_refused_when_it_hides_a_pixel():
    with pytest.raises(ImageRefused, match="transparent pixels"):
        decode_image(colour_keyed_png(key_present=True), "png")
    with pytest.raises(ImageRefused, match="transparent pixels"):
        decode_image(colour_keyed_gray_png(), "png")
    opaque = decode_image(colour_keyed_png(key_present=False), "png")  # the key matches nothing: nothing lost
    assert opaque.pixels.shape == (32, 32, 3)


def test_own_gamma_without_srgb_is_refused():
    chunks = PngImagePlugin.PngInfo()
    chunks.add(b"gAMA", (100000).to_bytes(4, "big"))  # gamma 1.0: renders far from sRGB
    data = _save(Image.fromarray(kodak_pixels(4, (16, 16))), "PNG", pnginfo=chunks)
    with pytest.raises(ImageRefused, match="gamma"):
        decode_image(data, "png")


def test_exif_icc_xmp_are_read_and_carried_in_a_version_4_bitstream(tiny_codec: LearnedCodec):
    data, expected = photo_with_metadata()
    image = decode_image(data, "jpg")
    assert image.metadata == expected
    analysed = tiny_codec.analyse([image.pixels])
    bits = tiny_codec.submit_entropy_coding(analysed, 0, "RGB", fmt.metadata_extensions(image.metadata)).result()
    parsed = fmt.parse(bits)
    assert parsed.header.version == 4 and parsed.header.quality == 0
    assert parsed.metadata == expected == fmt.image_metadata(bits)
    plain = tiny_codec.encode_batch([image.pixels], ["RGB"])[0]  # no metadata: the version it always had
    assert fmt.parse(plain).header.version == 1 and fmt.image_metadata(plain) == ImageMetadata()
    _, with_metadata = tiny_codec.decode(bits)
    _, without = tiny_codec.decode(plain)
    assert np.array_equal(with_metadata, without)  # the codec's decoder ignores the metadata


def test_metadata_kinds_are_refused_in_older_versions_and_over_the_limit(tiny_codec: LearnedCodec):
    plain = fmt.parse(tiny_codec.encode_batch([kodak_pixels(1, (16, 16))], ["RGB"])[0])
    xmp = (fmt.Extension(fmt.EXTENSION_XMP, XMP),)
    v4 = fmt.pack(fmt.Bitstream(plain.header, plain.z_stream, plain.y_streams, xmp))
    assert fmt.parse(v4).header.version == 4
    as_v3 = bytearray(v4)  # the same layout, relabelled version 3 (quality 1) with a valid header CRC
    fixed = fmt.HEADER_SIZE - 4 + 1
    as_v3[4], as_v3[fixed - 1] = 3, 1
    as_v3[fixed : fixed + 4] = zlib.crc32(bytes(as_v3[:fixed])).to_bytes(4, "little")
    with pytest.raises(fmt.BitstreamError, match="needs format version 4"):
        fmt.parse(bytes(as_v3))
    too_big = fmt.Extension(fmt.EXTENSION_ICC, bytes(fmt.MAX_METADATA_BYTES + 1))
    with pytest.raises(fmt.BitstreamError, match="cannot be written"):
        fmt.pack(fmt.Bitstream(plain.header, plain.z_stream, plain.y_streams, (too_big,)))


@pytest.mark.parametrize("name, model", [("v1", "mbt2018-mean-small-l0018"), ("v2", "mbt2018-mean-small-l0018"),
                                         ("v3", "mbt2018-mean-vbr-small"), ("v3-ext", "mbt2018-mean-vbr-small")])
def test_bitstreams_written_before_version_4_still_decode(name, model):
    """Fixtures written by ncpipe before version 4 (a 80x48 crop of Kodak 23) decode to the pixels
    that version decoded them to; the same image is still coded to the same bytes today."""
    data = (FIXTURES / f"{name}.ncb").read_bytes()
    expected = np.asarray(Image.open(FIXTURES / f"{name}.decoded.png"))
    codec = LearnedCodec(load_model(model), y_chunk_channels=64, coder_threads=1)
    try:
        header, pixels = codec.decode(data)
        # the latents are exact; g_s is float, so another CPU may round a pixel the other way
        assert np.abs(pixels.astype(int) - expected).max() <= 1
        assert fmt.image_metadata(data) == ImageMetadata()
        if name in ("v1", "v3"):
            image = kodak_pixels(23, (48, 80))
            assert codec.encode_batch([image], [header.source_mode])[0] == data
    finally:
        codec.close()


def test_compress_refuses_and_stores_unchanged_then_restores_metadata(tmp_path, tiny_model_path):
    from ncpipe.pipeline.jobs import run_compress, run_decompress

    photo, expected = photo_with_metadata()
    members = {"anim.webp": animated_webp(), "apng.png": apng(), "pages.tiff": multipage_tiff(),
               "keyed.png": colour_keyed_png(key_present=True), "photo.jpg": photo}
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "s.tar").write_bytes(tar_bytes(list(members.items())))
    archive, restored = tmp_path / "archive", tmp_path / "restored"
    run_compress(CompressConfig(inputs=(str(tmp_path / "in" / "s.tar"),), output=str(archive),
                                model=str(tiny_model_path), metrics=False))
    rows = {r["key"]: r for r in read_manifest(str(archive / "g0000" / "manifest")).to_pylist()}
    for key in ("anim", "apng", "pages"):
        assert rows[key]["status"] == "error" and "frames" in rows[key]["error"] and rows[key]["passthrough"]
    assert rows["keyed"]["status"] == "error" and "transparent" in rows["keyed"]["error"]
    assert rows["photo"]["status"] == "ok"
    run_decompress(DecompressConfig(inputs=(str(archive),), output=str(restored), to="directory",
                                    model=str(tiny_model_path)))
    out = restored / "s"
    for name, data in members.items():  # refused images come back byte for byte
        if name != "photo.jpg":
            assert (out / name).read_bytes() == data
    (restored_photo,) = out.glob("photo.*")  # restored in the source's format (or PNG): the metadata either way
    back = Image.open(restored_photo)
    assert back.size == (80, 48)  # pixels as stored ...
    assert back.getexif()[0x0112] == PORTRAIT_ORIENTATION  # ... and the orientation a viewer applies
    assert ImageOps.exif_transpose(back).size == ImageOps.exif_transpose(Image.open(io.BytesIO(photo))).size == (48, 80)
    assert back.info["icc_profile"] == expected.icc_profile
    xmp = back.info["xmp"]
    assert (xmp.encode() if isinstance(xmp, str) else xmp) == XMP
    assert read_manifest(str(restored / "_restore_manifest"), RESTORE_SCHEMA).num_rows == len(members)
