"""The learned codec: images <-> ncpipe bitstreams, in two stages.

::

    encode   pixels (B,H,W,3) u8 ──pad──► x (B,3,Hp,Wp) ──g_a,h_a──► y, z            [device, batched]
             z ─round(z−median)─► z_sym ──exact h_s──► (scale index, mean) per y element
             y_sym = round((y − mean) / Δ_q)                                          [device, batched]
             (z_sym, y_sym, scale index) ──rANS, one stream per chunk──► bitstream   [CPU threads]

    decode   bitstream ──parse──► z stream ──rANS──► z_sym ──exact h_s──► (index, mean)
             y streams ──rANS──► y_sym;  ŷ = Δ_q · y_sym + mean ──g_s──► x̂ ──crop──► pixels

``Δ_q`` is the quantization step of quality level ``q`` of a variable-rate model (per latent
channel; the header names ``q``); a fixed-rate model has ``Δ = 1`` and quality 0. The scale
index of an element is its table index for the scale ``σ / Δ_q``.

The only float computations whose results the *decoder* must reproduce exactly (the
entropy parameters) run in exact integer arithmetic (:mod:`ncpipe.entropy.integer_net`),
so a bitstream decodes to the same latents whatever device, batch size or thread count
encoded or decodes it. The transforms g_a/g_s stay in float: g_a only runs at the
encoder, and g_s only moves the reconstruction by float rounding.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ncpipe import bitstream as fmt
from ncpipe.entropy import rans
from ncpipe.entropy.integer_net import ACT_FRAC_BITS, from_fixed
from ncpipe.errors import NcpipeError
from ncpipe.models.checkpoint import CodecModel

DEFAULT_Y_CHUNK_CHANNELS = 32


class ModelMismatchError(NcpipeError, ValueError):
    """A bitstream was written by a different model than the one loaded."""


@dataclass(frozen=True)
class LatentSymbols:
    """The integers a bitstream holds for one image."""

    z: np.ndarray  # int32 (Cz, hz, wz)
    y: np.ndarray  # int32 (Cy, hy, wy)
    # The exact means μ (Cy, hy, wy) float64 the decoder derived from z, on the codec's device: carried so
    # that the integer h_s runs once per image (synthesis and diffusion decoders reuse them). None: derive them.
    means: torch.Tensor | None = None


@dataclass(frozen=True)
class AnalysedBatch:
    """Output of the device stage for a batch, ready for entropy coding on the CPU."""

    sizes: tuple[tuple[int, int], ...]  # (height, width) of each image
    quality: int  # the quality level every image of the batch was coded at (0: a fixed-rate model)
    z_symbols: np.ndarray  # int32 (B, Cz, hz, wz)
    y_symbols: np.ndarray  # int32 (B, Cy, hy, wy)
    scale_indexes: np.ndarray  # int32 (B, Cy, hy, wy)
    reconstructions: tuple[torch.Tensor, ...] | None  # (3, h, w) in [0, 1] on the device, or None
    means: torch.Tensor | None = None  # float64 (B, Cy, hy, wy) on the device: the exact μ the decoder will derive

    def symbols(self, index: int) -> LatentSymbols:
        means = None if self.means is None else self.means[index]
        return LatentSymbols(self.z_symbols[index], self.y_symbols[index], means)


def padded_shape(height: int, width: int) -> tuple[int, int]:
    stride = fmt.HYPER_STRIDE
    return math.ceil(height / stride) * stride, math.ceil(width / stride) * stride


def stack_padded(images: Sequence[np.ndarray], pin: bool) -> torch.Tensor:
    """Images (H,W,3 u8) sharing one padded shape -> (B,3,Hp,Wp) u8, edges replicated.

    Replicating the last row/column (instead of zero padding) costs almost no rate."""
    hp, wp = padded_shape(*images[0].shape[:2])
    batch = torch.empty((len(images), hp, wp, 3), dtype=torch.uint8, pin_memory=pin)
    array = batch.numpy()
    for out, image in zip(array, images):
        h, w = image.shape[:2]
        if padded_shape(h, w) != (hp, wp):
            raise ValueError(f"image {w}x{h} does not pad to this batch's {wp}x{hp}")
        out[:h, :w] = image
        out[:h, w:] = image[:, -1:]
        out[h:] = out[h - 1 : h]
    return batch.permute(0, 3, 1, 2)


class LearnedCodec:
    """Encodes and decodes with one loaded :class:`CodecModel` on one device."""

    def __init__(
        self,
        model: CodecModel,
        y_chunk_channels: int = DEFAULT_Y_CHUNK_CHANNELS,
        coder_threads: int | None = None,
    ):
        self.model = model
        self.y_chunk_channels = y_chunk_channels
        self.pool = ThreadPoolExecutor(coder_threads or os.cpu_count() or 1, thread_name_prefix="rans")

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def default_quality(self) -> int:
        """The quality an encoder uses when none is asked for (0 for a fixed-rate model)."""
        return self.model.quality.default if self.model.quality is not None else 0

    # -- entropy parameters: the exact, shared path ------------------------------------

    def entropy_parameters(self, z_symbols: torch.Tensor,
                           qualities: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """z symbols (B,Cz,hz,wz) and each image's quality (default: the model's) ->
        (scale table index int32, mean float64), each (B,Cy,hy,wy)."""
        qualities = list(qualities) if qualities is not None else [self.default_quality] * len(z_symbols)
        for quality in set(qualities):
            self.model.check_quality(quality)
        z_fixed = z_symbols.to(self.device, torch.float64) * 2.0**ACT_FRAC_BITS
        z_fixed = z_fixed + self.model.z_median_fixed.view(1, -1, 1, 1)
        scales, means = self.model.adapter.split_entropy_parameters(self.model.hyper(z_fixed))
        # index = number of the quality's table thresholds (bar the last) below the scale, as
        # CompressAI's build_indexes for σ/Δ, but on exact fixed-point integers, per channel.
        batch, channels = scales.shape[:2]
        thresholds = self.model.thresholds_fixed[torch.tensor(qualities, device=self.device)]
        indexes = torch.searchsorted(thresholds.reshape(batch * channels, -1).contiguous(),
                                     scales.reshape(batch * channels, -1).contiguous(), right=False)
        return indexes.view_as(scales).to(torch.int32), from_fixed(means)

    def steps(self, qualities: Sequence[int]) -> torch.Tensor:
        """Quantization steps Δ (B,Cy,1,1) float64 of each image's quality level."""
        return self.model.steps[torch.tensor(list(qualities), device=self.device)][:, :, None, None]

    def dequantize(self, y_symbols: torch.Tensor, means: torch.Tensor, qualities: Sequence[int]) -> torch.Tensor:
        """ŷ = Δ_q · y_sym + mean, float32 on the device: what the synthesis transform decodes."""
        y = y_symbols.to(self.device, torch.float64)
        return (y * self.steps(qualities) + means).float()

    def latents(self, headers: Sequence[fmt.BitstreamHeader], symbols: Sequence[LatentSymbols]) -> torch.Tensor:
        """ŷ (B,Cy,hy,wy) float32 on the device of images sharing one latent shape, from the means the
        symbols carry (the exact h_s runs only for those that carry none)."""
        qualities = [h.quality for h in headers]
        means = [s.means for s in symbols]
        missing = [i for i, m in enumerate(means) if m is None]
        if missing:
            z = torch.from_numpy(np.stack([symbols[i].z for i in missing]))
            for i, derived in zip(missing, self.entropy_parameters(z, [qualities[i] for i in missing])[1]):
                means[i] = derived
        y = torch.from_numpy(np.stack([s.y for s in symbols]))
        return self.dequantize(y, torch.stack([m.to(self.device) for m in means]), qualities)

    # -- encoder ---------------------------------------------------------------------

    @torch.inference_mode()
    def analyse(self, images: Sequence[np.ndarray], reconstruct: bool = False,
                quality: int | None = None) -> AnalysedBatch:
        """Device stage: images sharing one padded shape -> symbols and table indexes, at
        ``quality`` (default: the model's default quality)."""
        quality = self.default_quality if quality is None else quality
        qualities = [quality] * len(images)
        pin = self.device.type == "cuda"
        x = stack_padded(images, pin).to(self.device, non_blocking=pin).float().div_(255.0)
        y, z = self.model.adapter.analysis(x)
        z_symbols = torch.round(z - self.model.z_medians.view(1, -1, 1, 1))
        indexes, means = self.entropy_parameters(z_symbols, qualities)
        y_symbols = torch.round((y.double() - means) / self.steps(qualities))
        reconstructions = None
        if reconstruct:
            x_hat = self.model.adapter.synthesis(self.dequantize(y_symbols, means, qualities)).clamp_(0.0, 1.0)
            reconstructions = tuple(x_hat[i, :, : im.shape[0], : im.shape[1]] for i, im in enumerate(images))
        return AnalysedBatch(
            sizes=tuple((int(im.shape[0]), int(im.shape[1])) for im in images),
            quality=quality,
            z_symbols=z_symbols.to("cpu", torch.int32).numpy(),
            y_symbols=y_symbols.to("cpu", torch.int32).numpy(),
            scale_indexes=indexes.cpu().numpy(),
            reconstructions=reconstructions,
            means=means,
        )

    def header_for(self, height: int, width: int, source_mode: str, quality: int | None = None) -> fmt.BitstreamHeader:
        identity = self.model.identity
        quality = self.default_quality if quality is None else quality
        return fmt.expected_header(
            architecture=identity.arch,
            model_sha256=identity.sha256,
            rate=self.model.rate_of(quality),
            quality=quality,
            width=width,
            height=height,
            source_mode=source_mode,
            y_channels=self.model.adapter.latent_channels,
            z_channels=self.model.adapter.hyper_channels,
            y_chunk_channels=self.y_chunk_channels,
        )

    def submit_entropy_coding(self, batch: AnalysedBatch, index: int, source_mode: str,
                              extensions: tuple[fmt.Extension, ...] = ()) -> "PendingBitstream":
        """CPU stage for image ``index`` of ``batch``: its chunks are coded on the thread pool;
        ``extensions`` (the image's metadata, say) are packed after them."""
        height, width = batch.sizes[index]
        header = self.header_for(height, width, source_mode, batch.quality)
        z = batch.z_symbols[index]
        z_tables = _channel_index(z.shape)
        chunks = [self.pool.submit(rans.encode, z, z_tables, self.model.z_tables)]
        for start, stop in header.y_chunk_ranges():
            chunks.append(
                self.pool.submit(
                    rans.encode,
                    batch.y_symbols[index, start:stop],
                    batch.scale_indexes[index, start:stop],
                    self.model.y_tables,
                )
            )
        return PendingBitstream(header, tuple(chunks), extensions)

    def encode_batch(self, images: Sequence[np.ndarray], source_modes: Sequence[str],
                     quality: int | None = None) -> list[bytes]:
        """Both stages for a batch sharing one padded shape."""
        batch = self.analyse(images, quality=quality)
        futures = [self.submit_entropy_coding(batch, i, mode) for i, mode in enumerate(source_modes)]
        return [future.result() for future in futures]

    # -- decoder ---------------------------------------------------------------------

    def check_model(self, header: fmt.BitstreamHeader) -> None:
        identity = self.model.identity
        if header.model_sha256 != identity.sha256 or header.architecture != identity.arch:
            raise ModelMismatchError(
                f"bitstream needs model {header.architecture} sha256 {header.model_sha256} "
                f"(rate λ={header.rate:g}); loaded model is {identity.arch} sha256 {identity.sha256}"
            )
        channels = (self.model.adapter.latent_channels, self.model.adapter.hyper_channels)
        if (header.y_shape[0], header.z_shape[0]) != channels:
            raise fmt.BitstreamError(
                f"latent channels {header.y_shape[0]}/{header.z_shape[0]} do not match the model's {channels}"
            )
        try:
            rate = self.model.rate_of(header.quality)
        except ValueError as err:
            raise fmt.BitstreamError(str(err)) from None
        if header.rate != rate:
            raise fmt.BitstreamError(f"rate parameter {header.rate:g} does not match the model's "
                                     f"λ={rate:g} at quality {header.quality}")

    def decode_symbols(self, data: bytes, max_pixels: int | None = fmt.DEFAULT_MAX_PIXELS,
                       ) -> tuple[fmt.BitstreamHeader, LatentSymbols]:
        """Parse and entropy-decode one bitstream (CPU), raising BitstreamError if damaged;
        ``max_pixels`` as in :func:`ncpipe.bitstream.parse` (None: no limit)."""
        parsed = fmt.parse(data, max_pixels)
        header = parsed.header
        self.check_model(header)
        z_shape, y_shape = header.z_shape, header.y_shape
        z = _decode_stream(parsed.z_stream, _channel_index(z_shape), self.model.z_tables, "z")
        z = z.reshape(z_shape)
        indexes, means = self.entropy_parameters(torch.from_numpy(z)[None], [header.quality])
        indexes = indexes[0].cpu().numpy()
        futures = [
            self.pool.submit(_decode_stream, stream, indexes[start:stop], self.model.y_tables, f"y[{start}:{stop}]")
            for stream, (start, stop) in zip(parsed.y_streams, header.y_chunk_ranges())
        ]
        y = np.concatenate([f.result().reshape(-1, *y_shape[1:]) for f in futures]).reshape(y_shape)
        return header, LatentSymbols(z, y, means[0])

    @torch.inference_mode()
    def synthesise(self, headers: Sequence[fmt.BitstreamHeader],
                   symbols: Sequence[LatentSymbols]) -> list[torch.Tensor]:
        """Decoded symbols of images sharing one latent shape -> x̂ (3,h,w) in [0,1], on the device."""
        x_hat = self.model.adapter.synthesis(self.latents(headers, symbols)).clamp_(0.0, 1.0)
        return [x_hat[i, :, : h.height, : h.width] for i, h in enumerate(headers)]

    def decode(self, data: bytes) -> tuple[fmt.BitstreamHeader, np.ndarray]:
        """One bitstream -> (header, HxWx3 uint8 pixels)."""
        header, symbols = self.decode_symbols(data)
        (x_hat,) = self.synthesise([header], [symbols])
        return header, to_uint8_image(x_hat)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def to_uint8_image(x_hat: torch.Tensor) -> np.ndarray:
    """(3,h,w) in [0,1] -> (h,w,3) uint8, rounding to nearest."""
    return x_hat.mul(255.0).round_().to("cpu", torch.uint8).permute(1, 2, 0).contiguous().numpy()


def _channel_index(shape: Sequence[int]) -> np.ndarray:
    """Table index of each z element: its channel (one table per hyper-latent channel)."""
    channels, height, width = shape
    return np.repeat(np.arange(channels, dtype=np.int32), height * width)


def _decode_stream(stream: bytes, indexes: np.ndarray, tables, name: str) -> np.ndarray:
    try:
        return rans.decode(stream, indexes, tables)
    except rans.EntropyCodingError as err:
        raise fmt.BitstreamError(f"latent {name}: {err}") from None


@dataclass(frozen=True)
class PendingBitstream:
    """Chunks being coded on the pool; :meth:`result` packs them (never call it from the pool)."""

    header: fmt.BitstreamHeader
    chunks: tuple[Future, ...]
    extensions: tuple[fmt.Extension, ...] = ()

    def result(self) -> bytes:
        streams = [chunk.result() for chunk in self.chunks]
        return fmt.pack(fmt.Bitstream(self.header, streams[0], tuple(streams[1:]), self.extensions))
