"""Codecs by model SHA-256, loaded once each.

An archive may hold bitstreams of several models (after a recompression); each bitstream names
its model by digest, and restore, recompression and verify decode it with that model: the one
given, or the registry's (or model store's) model with that digest, loaded on first use.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import torch

from ncpipe import bitstream as fmt
from ncpipe.codec import LearnedCodec, ModelMismatchError, to_uint8_image
from ncpipe.models.checkpoint import CheckpointError
from ncpipe.models.registry import describe_sha256, find_by_sha256, load_model

log = logging.getLogger(__name__)


class CodecCache:
    """The models ``given`` (names or paths), and unless ``only_given`` registry models on first use.
    Thread-safe; a model that cannot be had is asked for once, and the reason kept in ``unavailable``."""

    def __init__(self, device: torch.device, threads: int, given: tuple[str, ...] = (), only_given: bool = False):
        self.device = device
        self.threads = threads
        self.given = given
        self.only_given = only_given
        self.codecs: dict[str, LearnedCodec] = {}
        self.unavailable: dict[str, str] = {}
        self.lock = threading.Lock()
        for name in given:
            self._add(name)

    def _add(self, name: str) -> LearnedCodec:
        codec = LearnedCodec(load_model(name).to(self.device), coder_threads=self.threads)
        self.codecs[codec.model.identity.sha256] = codec
        log.info("loaded %s (%s)", name, codec.model.identity.short)
        return codec

    def lookup(self, sha256: str, architecture: str = "") -> LearnedCodec | None:
        """The codec of model ``sha256``, or None with the reason in ``unavailable[sha256]``."""
        with self.lock:
            if sha256 in self.codecs or sha256 in self.unavailable:
                return self.codecs.get(sha256)
            ref = None if self.only_given else find_by_sha256(sha256)
            if ref is None:
                given = f"; the model(s) given ({', '.join(self.given)}) differ" if self.given else " (pass --model)"
                self.unavailable[sha256] = (f"bitstream needs model {architecture} {describe_sha256(sha256)}, "
                                            f"which is not available here{given}")
                return None
            try:
                return self._add(ref.name)
            except CheckpointError as err:
                self.unavailable[sha256] = f"model {ref.name} needed by this bitstream failed to load: {err}"
                return None

    def codec_for(self, header: fmt.BitstreamHeader) -> LearnedCodec:
        """The codec for a bitstream's model, or :class:`ModelMismatchError` naming the one needed."""
        codec = self.lookup(header.model_sha256, header.architecture)
        if codec is None:
            raise ModelMismatchError(self.unavailable[header.model_sha256])
        return codec

    def decode_pixels(self, data: bytes, max_pixels: int) -> tuple[fmt.BitstreamHeader, np.ndarray]:
        """One bitstream -> (header, HxWx3 uint8), with whichever model wrote it."""
        codec = self.codec_for(fmt.parse_header(data, max_pixels))
        header, symbols = codec.decode_symbols(data, max_pixels)
        (x_hat,) = codec.synthesise([header], [symbols])
        return header, to_uint8_image(x_hat)

    def close(self) -> None:
        for codec in self.codecs.values():
            codec.close()
