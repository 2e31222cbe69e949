"""Restored PNGs: written at a speed-oriented zlib level by default, the level an option that changes the
file's size, never its pixels."""

import io

import numpy as np
import pytest
from PIL import Image

from ncpipe.config import ConfigError, DecompressConfig
from ncpipe.images import DEFAULT_PNG_LEVEL, ImageMetadata
from ncpipe.pipeline.decompress import RestoreFormats
from tests.factories import kodak_pixels


def test_the_default_level_favours_speed_and_levels_outside_zlibs_are_refused():
    assert DecompressConfig(inputs=("a",), output="b").png_level == DEFAULT_PNG_LEVEL == 1
    for level in (-1, 10):
        with pytest.raises(ConfigError, match="png_level"):
            DecompressConfig(inputs=("a",), output="b", png_level=level)


def test_every_level_restores_the_same_pixels():
    image = Image.fromarray(kodak_pixels(3, (64, 96)))
    files = {level: RestoreFormats("png", 90, {}, level).encode(image, ("png", "PNG", False), ImageMetadata())
             for level in (0, 1, 9)}
    assert len(set(files.values())) == 3  # the level reached the encoder
    for data in files.values():
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), np.asarray(image))
