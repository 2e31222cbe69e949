"""Decoding image members into 8-bit RGB pixels, and writing them back.

What is coded and what is refused (a refused image becomes an error row and its
original bytes are carried through unchanged, so nothing is lost):

====================  =============================================================
source                handling
====================  =============================================================
8-bit RGB             coded as is
8-bit L (grayscale)   coded as RGB, restored as L
P (palette)           coded as RGB, restored as RGB (the palette is not kept)
RGBA / LA / PA        coded as RGB if every alpha value is 255 (restored with an
                      opaque alpha); refused if any pixel is transparent
RGB / L with a tRNS   as RGBA: coded if the colour key occurs nowhere (restored
colour key            without it), refused if any pixel is transparent
16-bit, float, CMYK   refused: ncpipe's codecs model 8-bit RGB
several frames        refused (animated WebP, APNG, multi-page TIFF, MPO): only one
                      image per bitstream, and no frame is dropped
gAMA / cHRM without   refused: colour rendering ncpipe would not reproduce
sRGB or ICC (PNG)
====================  =============================================================

EXIF, ICC profile and XMP travel with the pixels (:class:`ImageMetadata`, carried in the
bitstream, ``docs/bitstream.md``) and are written into the restored PNG; a block over
:data:`MAX_METADATA_BYTES` is refused. Orientation: the stored pixel grid is what gets
coded, and the EXIF (Orientation tag included) is restored unchanged, so a viewer that
rotates the source rotates the restore the same way. Descriptive metadata outside these
three (PNG text chunks, JPEG comments, DPI) is not kept.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, PngImagePlugin

from ncpipe.errors import NcpipeError

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff"})
DECODABLE_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "TIFF", "MPO"})
DEFAULT_MAX_PIXELS = 64_000_000
MAX_METADATA_BYTES = 1 << 20  # per EXIF / ICC / XMP block
_TIFF_ORIENTATION, _TIFF_XMP = 274, 700

# Source modes and the mode their restore is written in.
RESTORED_MODE = {"RGB": "RGB", "L": "L", "P": "RGB", "RGBA": "RGBA", "LA": "LA", "PA": "RGBA"}
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA"})


class ImageRefused(NcpipeError, ValueError):
    """This image member cannot be coded; the message says why."""


@dataclass(frozen=True)
class ImageMetadata:
    """What an image carries besides its pixels that ncpipe keeps (raw bytes, None when absent)."""

    exif: bytes | None = None  # TIFF-structured EXIF, without JPEG's "Exif\0\0" prefix
    icc_profile: bytes | None = None
    xmp: bytes | None = None  # UTF-8 XML packet

    def __bool__(self) -> bool:
        return any((self.exif, self.icc_profile, self.xmp))


@dataclass(frozen=True)
class DecodedImage:
    """An image as ncpipe codes it: HxWx3 uint8 RGB, plus what it came from."""

    pixels: np.ndarray
    source_format: str
    source_mode: str
    metadata: ImageMetadata = ImageMetadata()

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


def is_image_member(extension: str) -> bool:
    return extension.lower() in IMAGE_EXTENSIONS


def decode_image(data: bytes, extension: str = "", max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode ``data``; raise :class:`ImageRefused` with the reason when it cannot be coded."""
    if not data:
        raise ImageRefused(f"zero-byte image member (.{extension})")
    with warnings.catch_warnings():
        # Pillow warns about large images; the explicit pixel limit below decides instead.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as err:
            raise ImageRefused(f"declared size exceeds the limit of {max_pixels} pixels ({err})") from None
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageRefused(f"not a readable image: {err}") from None
        _check_declared(image, max_pixels)
        try:
            image.load()
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
            raise ImageRefused(f"corrupt or truncated {image.format} data: {err}") from None
    return DecodedImage(_to_rgb(image), image.format, image.mode, read_metadata(image))


def read_metadata(image: Image.Image) -> ImageMetadata:
    """The EXIF, ICC profile and XMP of an opened image; refused when one is over the limit."""
    exif = image.info.get("exif")
    xmp = image.info.get("xmp")
    if image.format == "TIFF":  # TIFF keeps these as tags of its own IFD, not as blocks
        xmp = image.tag_v2.get(_TIFF_XMP)
        orientation = image.tag_v2.get(_TIFF_ORIENTATION, 1)
        if orientation != 1:
            tags = Image.Exif()
            tags[_TIFF_ORIENTATION] = orientation
            exif = tags.tobytes()
    if isinstance(exif, bytes) and exif.startswith(b"Exif\x00\x00"):
        exif = exif[6:]
    if isinstance(xmp, str):
        xmp = xmp.encode("utf-8")
    if xmp and not _is_utf8(bytes(xmp)):
        raise ImageRefused("XMP packet is not UTF-8; ncpipe carries UTF-8 XMP only")
    metadata = ImageMetadata(exif or None, image.info.get("icc_profile") or None, bytes(xmp) if xmp else None)
    for name, block in (("EXIF", metadata.exif), ("ICC profile", metadata.icc_profile), ("XMP", metadata.xmp)):
        if block is not None and len(block) > MAX_METADATA_BYTES:
            raise ImageRefused(f"{name} of {len(block)} bytes exceeds the {MAX_METADATA_BYTES} bytes ncpipe carries")
    return metadata


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _check_declared(image: Image.Image, max_pixels: int) -> None:
    width, height = image.size
    if image.format not in DECODABLE_FORMATS:
        raise ImageRefused(f"image format {image.format} is not supported")
    if width < 1 or height < 1:
        raise ImageRefused(f"declared size {width}x{height} is empty")
    if width * height > max_pixels:
        raise ImageRefused(
            f"declared size {width}x{height} exceeds the limit of {max_pixels} pixels "
            "(possible decompression bomb; raise --max-pixels to code it)"
        )
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        raise ImageRefused(f"{image.format} holds {frames} frames; ncpipe codes single-frame images only")
    info = image.info
    if ("gamma" in info or "chromaticity" in info) and not ("srgb" in info or "icc_profile" in info):
        raise ImageRefused(f"{image.format} declares its own gamma/chromaticities, which ncpipe does not carry")
    if image.mode not in RESTORED_MODE or any(";16" in str(tile.args) for tile in image.tile):
        raise ImageRefused(
            f"{image.format} mode {image.mode} ({_bit_depth(image)}) is not supported: "
            "ncpipe codes 8-bit RGB, grayscale and palette images"
        )


def _bit_depth(image: Image.Image) -> str:
    return "16-bit" if any(";16" in str(tile.args) for tile in image.tile) else "not 8-bit RGB"


def _to_rgb(image: Image.Image) -> np.ndarray:
    if "transparency" in image.info:  # a palette entry or a tRNS colour key of RGB / L
        image = image.convert("RGBA")
    if image.mode in _ALPHA_MODES or image.mode == "RGBA":
        alpha = np.asarray(image.getchannel("A"))
        if alpha.min() < 255:
            raise ImageRefused("image has transparent pixels; ncpipe codes opaque images only")
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


def restore_image(pixels: np.ndarray, source_mode: str) -> Image.Image:
    """Decoded RGB pixels -> an image in the mode the source is restored in."""
    target = RESTORED_MODE.get(source_mode, "RGB")
    image = Image.fromarray(pixels, "RGB")
    return image if target == "RGB" else image.convert(target)


# zlib level of restored PNGs: 1 favours speed. On a codec's reconstructions it encodes several times
# faster than Pillow's default 6 for files of about the same size (zlib's deeper search finds little in them).
DEFAULT_PNG_LEVEL = 1


def encode_png(image: Image.Image, metadata: ImageMetadata = ImageMetadata(), level: int = DEFAULT_PNG_LEVEL) -> bytes:
    """PNG bytes of ``image`` at zlib ``level`` (0-9), with ``metadata`` as eXIf, iCCP and an XMP iTXt chunk."""
    extra: dict = {}
    if metadata.exif:
        extra["exif"] = metadata.exif
    if metadata.icc_profile:
        extra["icc_profile"] = metadata.icc_profile
    if metadata.xmp:
        text = PngImagePlugin.PngInfo()
        text.add_itxt("XML:com.adobe.xmp", metadata.xmp.decode("utf-8"), zip=True)
        extra["pnginfo"] = text
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=level, **extra)
    return buffer.getvalue()


# A restore writes each image in its source's format (what the manifest recorded); these are
# the formats it can write, by the name Pillow gives them (MPO: a JPEG with extra frames).
RESTORE_FORMATS = {"JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG", "WEBP": "WEBP", "BMP": "BMP", "TIFF": "TIFF"}
DEFAULT_RESTORE_QUALITY = 90  # JPEG and lossy WebP restores: near-transparent to the codec's own loss
_JPEG_MODES = frozenset({"L", "RGB"})


def encode_image(image: Image.Image, image_format: str, metadata: ImageMetadata = ImageMetadata(),
                 quality: int = DEFAULT_RESTORE_QUALITY, lossless: bool = False,
                 png_level: int = DEFAULT_PNG_LEVEL) -> bytes:
    """``image`` as ``image_format`` (a value of :data:`RESTORE_FORMATS`), carrying the metadata the format holds."""
    if image_format == "PNG":
        return encode_png(image, metadata, png_level)
    extra: dict = {}
    if image_format in ("JPEG", "WEBP"):
        extra = {"lossless": True} if lossless else {"quality": quality}
        if metadata.exif:  # JPEG's APP1 block starts with its identifier; WebP's EXIF chunk does not
            extra["exif"] = (b"Exif\x00\x00" if image_format == "JPEG" else b"") + metadata.exif
        if metadata.xmp:
            extra["xmp"] = metadata.xmp
    if metadata.icc_profile and image_format != "BMP":
        extra["icc_profile"] = metadata.icc_profile
    if image_format == "JPEG" and image.mode not in _JPEG_MODES:
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **extra)
    return buffer.getvalue()
