"""Codecs over the tiny trained models, coded in small chunks (8 latent channels) on 2 threads, so
the tests reach several y chunks and the thread pool."""

from contextlib import contextmanager

import pytest

from ncpipe.codec import LearnedCodec
from ncpipe.models.checkpoint import load_codec_model


@contextmanager
def chunked_codec(path):
    codec = LearnedCodec(load_codec_model(path), y_chunk_channels=8, coder_threads=2)
    try:
        yield codec
    finally:
        codec.close()


@pytest.fixture(scope="module")
def codec(tiny_model_path):
    with chunked_codec(tiny_model_path) as codec:
        yield codec


@pytest.fixture(scope="module")
def vbr(tiny_vbr_model_path):
    with chunked_codec(tiny_vbr_model_path) as codec:
        yield codec
