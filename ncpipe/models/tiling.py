"""The synthesis transform g_s in tiles: decoder memory bounded by the tile, not the image.

g_s of the hyperprior models (``bmshj2018-hyperprior``, ``mbt2018-mean``) is four transposed
convolutions (kernel 5, stride 2, padding 2, output padding 1) with inverse GDN between them.
Output pixel ``o`` of such a layer reads input pixels ``(o - 2)/2 .. (o + 2)/2``: one input pixel
either side. GDN mixes channels, never positions. So a latent position influences output pixels
within ``1 + 1/2 + 1/4 + 1/8 < 2`` latent positions of it, and a tile synthesised with
:data:`LATENT_MARGIN` ≥ 2 latent rows and columns of context on each inner side computes its
centre from exactly the inputs the whole image would; the image's own edges are edges of the
tiles that touch them, with the same zero padding. The values are the same sums of the same
products; only the convolution algorithm's order of summation may differ with the input's size
(float rounding, measured in docs/reliability.md).
"""

from __future__ import annotations

from typing import Callable

import torch

LATENT_TILE = 32  # latent rows / columns per tile: 512 x 512 output pixels at g_s's stride of 16
LATENT_MARGIN = 4  # context each side, twice the reach derived above
# Latents of at most this many positions (64 x 64: a megapixel of output) are synthesised whole:
# their peak is bounded by that size already, and tiles would recompute their margins (on a 768 x 512
# image, 56 latent columns synthesised for its 48) for no memory a decoder needs back.
WHOLE_LATENT_POSITIONS = 64 * 64


def synthesise(g_s: Callable[[torch.Tensor], torch.Tensor], y_hat: torch.Tensor) -> torch.Tensor:
    """``g_s(y_hat)``: whole up to :data:`WHOLE_LATENT_POSITIONS` latent positions (read at each call),
    in tiles beyond."""
    if y_hat.shape[-2] * y_hat.shape[-1] <= WHOLE_LATENT_POSITIONS:
        return g_s(y_hat)
    return synthesise_tiled(g_s, y_hat)


def synthesise_tiled(g_s: Callable[[torch.Tensor], torch.Tensor], y_hat: torch.Tensor,
                     tile: int | None = None, margin: int | None = None) -> torch.Tensor:
    """``g_s(y_hat)`` computed tile by tile (default: :data:`LATENT_TILE`, :data:`LATENT_MARGIN`, read
    at each call); one call when the latent fits in one tile with its margin."""
    tile = LATENT_TILE if tile is None else tile
    margin = LATENT_MARGIN if margin is None else margin
    batch, _, height, width = y_hat.shape
    if height <= tile + 2 * margin and width <= tile + 2 * margin:
        return g_s(y_hat)
    out: torch.Tensor | None = None
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            rows = slice(max(0, top - margin), min(height, top + tile + margin))
            cols = slice(max(0, left - margin), min(width, left + tile + margin))
            piece = g_s(y_hat[:, :, rows, cols])
            if out is None:
                stride = piece.shape[-1] // (cols.stop - cols.start)  # output pixels per latent position
                out = piece.new_empty(batch, piece.shape[1], height * stride, width * stride)
            h, w = min(tile, height - top) * stride, min(tile, width - left) * stride
            dy, dx = (top - rows.start) * stride, (left - cols.start) * stride
            out[:, :, top * stride : top * stride + h, left * stride : left * stride + w] = \
                piece[:, :, dy : dy + h, dx : dx + w]
            del piece
    return out
