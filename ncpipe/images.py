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
16-bit, float, CMYK   refused: ncpipe's codecs model 8-bit RGB
====================  =============================================================

EXIF orientation is not applied: the stored pixel grid is what gets coded.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff"})
DECODABLE_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "TIFF", "MPO"})
DEFAULT_MAX_PIXELS = 64_000_000

# Source modes and the mode their restore is written in.
RESTORED_MODE = {"RGB": "RGB", "L": "L", "P": "RGB", "RGBA": "RGBA", "LA": "LA", "PA": "RGBA"}
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA"})


class ImageRefused(ValueError):
    """This image member cannot be coded; the message says why."""


@dataclass(frozen=True)
class DecodedImage:
    """An image as ncpipe codes it: HxWx3 uint8 RGB, plus what it came from."""

    pixels: np.ndarray
    source_format: str
    source_mode: str

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
    return DecodedImage(_to_rgb(image), image.format, image.mode)


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
    if image.mode not in RESTORED_MODE or any(";16" in str(tile.args) for tile in image.tile):
        raise ImageRefused(
            f"{image.format} mode {image.mode} ({_bit_depth(image)}) is not supported: "
            "ncpipe codes 8-bit RGB, grayscale and palette images"
        )


def _bit_depth(image: Image.Image) -> str:
    return "16-bit" if any(";16" in str(tile.args) for tile in image.tile) else "not 8-bit RGB"


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode == "P" and "transparency" in image.info:
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


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()
