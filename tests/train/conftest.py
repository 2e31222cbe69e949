"""The diffusion trainers' tests share the tiny codec and run torch on one thread."""

from __future__ import annotations

import pytest

from ncpipe.codec import LearnedCodec


@pytest.fixture(scope="module")
def codec(tiny_codec: LearnedCodec) -> LearnedCodec:
    return tiny_codec


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread: None) -> None:
    """Every test here runs torch on one thread (tests/conftest.py says why)."""
