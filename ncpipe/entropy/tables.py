"""Quantized-CDF tables: built once per model, stored in its checkpoint, validated on load.

Storing the tables (instead of recomputing them from float parameters on each machine)
is what lets a bitstream written on one device decode on another: every coder uses
exactly the same integers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ncpipe.entropy.rans import PROB_TOTAL
from ncpipe.errors import NcpipeError


class TableError(NcpipeError, ValueError):
    """Stored probability tables are malformed."""


@dataclass(frozen=True)
class CdfTables:
    """``num_tables`` quantized CDFs in CompressAI's layout (see :mod:`ncpipe.entropy.rans`)."""

    cdfs: np.ndarray  # (num_tables, max_length) int32, rows zero-padded
    cdf_lengths: np.ndarray  # (num_tables,) int32
    offsets: np.ndarray  # (num_tables,) int32

    def __post_init__(self) -> None:
        validate_tables(self.cdfs, self.cdf_lengths, self.offsets)

    @property
    def num_tables(self) -> int:
        return int(self.cdf_lengths.shape[0])

    @classmethod
    def from_tensors(cls, cdfs: torch.Tensor, cdf_lengths: torch.Tensor, offsets: torch.Tensor) -> "CdfTables":
        return cls(
            np.ascontiguousarray(cdfs.cpu().numpy(), dtype=np.int32),
            np.ascontiguousarray(cdf_lengths.cpu().numpy().reshape(-1), dtype=np.int32),
            np.ascontiguousarray(offsets.cpu().numpy().reshape(-1), dtype=np.int32),
        )

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "cdfs": torch.from_numpy(self.cdfs.copy()),
            "cdf_lengths": torch.from_numpy(self.cdf_lengths.copy()),
            "offsets": torch.from_numpy(self.offsets.copy()),
        }


def validate_tables(cdfs: np.ndarray, cdf_lengths: np.ndarray, offsets: np.ndarray) -> None:
    """Each CDF must start at 0, end at 2^16 and rise strictly (every symbol codable)."""
    if cdfs.ndim != 2 or cdf_lengths.ndim != 1 or offsets.shape != cdf_lengths.shape:
        raise TableError(f"table shapes {cdfs.shape}, {cdf_lengths.shape}, {offsets.shape} do not agree")
    if cdfs.shape[0] != cdf_lengths.shape[0] or cdfs.shape[0] == 0:
        raise TableError("number of CDFs and of CDF lengths differ (or is zero)")
    if cdf_lengths.min() < 3 or cdf_lengths.max() > cdfs.shape[1]:
        raise TableError("a CDF length is below 3 or beyond the stored row")
    for k, length in enumerate(cdf_lengths):
        row = cdfs[k, :length]
        if row[0] != 0 or row[-1] != PROB_TOTAL or np.any(np.diff(row) <= 0):
            raise TableError(f"CDF {k} is not a strictly increasing 0..{PROB_TOTAL} table")
