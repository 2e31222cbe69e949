"""Named U-Net sizes, without torch: the command line offers them before any model is built."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class UNetSize:
    """The size of a U-Net: what a named preset fixes."""

    base_channels: int
    channel_mults: tuple[int, ...]
    blocks_per_level: int
    time_embed_dim: int


# Named sizes (parameter counts of an NC-Diffusion refiner with ŷ and log λ conditioning: docs/nc-diffusion.md).
UNET_PRESETS: dict[str, UNetSize] = {
    "tiny": UNetSize(8, (1, 2), 1, 32),  # tests and CPU smoke runs
    "small": UNetSize(32, (1, 2, 2), 1, 128),  # the size of the shipped nc-diffusion-small
    "base": UNetSize(48, (1, 2, 4, 4), 2, 256),  # 8.6 M parameters; AFFM on each of its three skips
}
