"""Range asymmetric numeral systems (rANS) coder, compiled with numba, GIL-free.

Why not CompressAI's coder: it takes Python lists, holds the GIL and codes one image
at a time, which caps a GPU node far below its transform throughput. This coder takes
numpy arrays, releases the GIL (``nogil=True``) so a thread pool codes many streams at
once, and checks itself on decode (the final state and the stream length must match).

Parameters (Duda 2013; Giesen's "ryg_rans" layout): 32-bit state ``x`` kept in
``[L, L·2^16)`` with ``L = 2^16``, 16-bit output words, probabilities quantized to
``PRECISION = 16`` bits. Each symbol emits at most one word, so a stream of ``n``
symbols holds at most ``n + 2`` words (the last two are the final state).

Tables follow CompressAI's quantized-CDF convention, so its ``update()`` output can be
used unchanged: for table ``k`` the CDF has ``cdf_length[k]`` entries, symbols
``0 .. cdf_length[k]-3`` are regular and ``cdf_length[k]-2`` is the *escape*; a value
``v`` maps to symbol ``v - offset[k]``. Values outside the table's range are coded as
the escape symbol plus a zigzag LEB128 varint in a separate escape area.

Stream layout (all little-endian): ``u32 word_count | word_count x u16 | escape bytes``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numba import njit

from ncpipe.errors import NcpipeError

if TYPE_CHECKING:
    from ncpipe.entropy.tables import CdfTables

PRECISION = 16
RANS_L = 1 << 16
PROB_TOTAL = 1 << PRECISION
# Escaped values beyond this magnitude are refused: it bounds every decoded value,
# which the integer hyper-synthesis relies on, and no trained latent comes near it.
MAX_ESCAPED_MAGNITUDE = 1 << 20
_MAX_VARINT_BYTES = 4  # ceil(22 bits / 7)

# Decoder status codes (numba cannot raise with a payload).
OK = 0
ERR_WORDS_EXHAUSTED = 1
ERR_BAD_TABLE_INDEX = 2
ERR_ESCAPE_EXHAUSTED = 3
ERR_ESCAPE_RANGE = 4
ERR_FINAL_STATE = 5
ERR_TRAILING_DATA = 6
ERR_VALUE_RANGE = 7

DECODE_ERRORS = {
    ERR_WORDS_EXHAUSTED: "stream ended before all symbols were decoded",
    ERR_BAD_TABLE_INDEX: "a probability-table index is out of range",
    ERR_ESCAPE_EXHAUSTED: "escape area ended before all escaped values were read",
    ERR_ESCAPE_RANGE: "an escaped value is malformed or out of range",
    ERR_FINAL_STATE: "final coder state mismatch (stream is corrupt or was coded with other tables)",
    ERR_TRAILING_DATA: "data left over after the last symbol",
    ERR_VALUE_RANGE: "a value is outside the codable range",
}


class EntropyCodingError(NcpipeError, ValueError):
    """A stream could not be coded or decoded; the message says why."""


@njit(nogil=True, cache=True)
def _zigzag_varint(value, out, pos):
    u = (value << 1) if value >= 0 else ((-value) << 1) - 1
    while u >= 0x80:
        out[pos] = (u & 0x7F) | 0x80
        u >>= 7
        pos += 1
    out[pos] = u
    return pos + 1


@njit(nogil=True, cache=True)
def _encode_kernel(values, table_index, cdfs, cdf_lengths, offsets, words, escapes):
    """Returns (word_count, escape_byte_count) or (-1, i) if value i cannot be coded."""
    n = values.shape[0]
    # Escapes are written in forward order so the decoder reads them in forward order.
    esc_pos = 0
    for i in range(n):
        k = table_index[i]
        s = values[i] - offsets[k]
        if s < 0 or s >= cdf_lengths[k] - 2:
            v = values[i]
            if v > MAX_ESCAPED_MAGNITUDE or v < -MAX_ESCAPED_MAGNITUDE:
                return -1, i
            esc_pos = _zigzag_varint(v, escapes, esc_pos)
    x = np.uint64(RANS_L)
    w = 0
    for j in range(n):
        i = n - 1 - j
        k = table_index[i]
        s = values[i] - offsets[k]
        if s < 0 or s >= cdf_lengths[k] - 2:
            s = cdf_lengths[k] - 2
        start = np.uint64(cdfs[k, s])
        freq = np.uint64(cdfs[k, s + 1]) - start
        x_max = freq << np.uint64(32 - PRECISION)
        if x >= x_max:
            words[w] = np.uint16(x & np.uint64(0xFFFF))
            w += 1
            x >>= np.uint64(16)
        x = (x // freq << np.uint64(PRECISION)) + (x % freq) + start
    words[w] = np.uint16(x & np.uint64(0xFFFF))
    words[w + 1] = np.uint16(x >> np.uint64(16))
    w += 2
    # Emitted last-symbol-first: reverse so the decoder reads front to back.
    words[:w] = words[:w][::-1].copy()
    return w, esc_pos


@njit(nogil=True, cache=True)
def _read_varint(escapes, pos):
    u = 0
    shift = 0
    for _ in range(_MAX_VARINT_BYTES):
        if pos >= escapes.shape[0]:
            return 0, -1
        b = escapes[pos]
        pos += 1
        u |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            value = (u >> 1) if (u & 1) == 0 else -((u + 1) >> 1)
            if value > MAX_ESCAPED_MAGNITUDE or value < -MAX_ESCAPED_MAGNITUDE:
                return 0, -2
            return value, pos
    return 0, -2


@njit(nogil=True, cache=True)
def _decode_kernel(words, escapes, table_index, cdfs, cdf_lengths, offsets, out):
    n = out.shape[0]
    n_words = words.shape[0]
    n_tables = cdf_lengths.shape[0]
    if n_words < 2:
        return ERR_WORDS_EXHAUSTED
    x = (np.uint64(words[0]) << np.uint64(16)) | np.uint64(words[1])
    pos = 2
    esc_pos = 0
    mask = np.uint64(PROB_TOTAL - 1)
    for i in range(n):
        k = table_index[i]
        if k < 0 or k >= n_tables:
            return ERR_BAD_TABLE_INDEX
        slot = np.int64(x & mask)
        # Binary search for s with cdf[s] <= slot < cdf[s+1] among cdf_length-1 symbols.
        lo = 0
        hi = cdf_lengths[k] - 1
        while hi - lo > 1:
            mid = (lo + hi) >> 1
            if cdfs[k, mid] <= slot:
                lo = mid
            else:
                hi = mid
        s = lo
        start = np.uint64(cdfs[k, s])
        freq = np.uint64(cdfs[k, s + 1]) - start
        x = freq * (x >> np.uint64(PRECISION)) + np.uint64(slot) - start
        if x < np.uint64(RANS_L):
            if pos >= n_words:
                return ERR_WORDS_EXHAUSTED
            x = (x << np.uint64(16)) | np.uint64(words[pos])
            pos += 1
        if s == cdf_lengths[k] - 2:
            value, esc_pos = _read_varint(escapes, esc_pos)
            if esc_pos == -1:
                return ERR_ESCAPE_EXHAUSTED
            if esc_pos == -2:
                return ERR_ESCAPE_RANGE
            out[i] = value
        else:
            out[i] = s + offsets[k]
    if x != np.uint64(RANS_L):
        return ERR_FINAL_STATE
    if pos != n_words or esc_pos != escapes.shape[0]:
        return ERR_TRAILING_DATA
    return OK


def encode(values: np.ndarray, table_index: np.ndarray, tables: CdfTables) -> bytes:
    """Code int32 ``values`` with per-value table ``table_index``; returns one stream."""
    values = np.ascontiguousarray(values, dtype=np.int32).reshape(-1)
    table_index = np.ascontiguousarray(table_index, dtype=np.int32).reshape(-1)
    if values.shape != table_index.shape:
        raise EntropyCodingError("values and table indexes differ in length")
    if table_index.size and (table_index.min() < 0 or table_index.max() >= tables.num_tables):
        raise EntropyCodingError("table index out of range")
    words = np.empty(values.size + 2, dtype=np.uint16)
    escapes = np.empty(values.size * _MAX_VARINT_BYTES, dtype=np.uint8)
    n_words, n_escape = _encode_kernel(
        values, table_index, tables.cdfs, tables.cdf_lengths, tables.offsets, words, escapes
    )
    if n_words < 0:
        raise EntropyCodingError(
            f"value {int(values[n_escape])} exceeds the codable magnitude {MAX_ESCAPED_MAGNITUDE}"
        )
    return b"".join(
        (np.uint32(n_words).tobytes(), words[:n_words].astype("<u2").tobytes(), escapes[:n_escape].tobytes())
    )


def decode(stream: bytes | memoryview, table_index: np.ndarray, tables: CdfTables) -> np.ndarray:
    """Inverse of :func:`encode`; raises :class:`EntropyCodingError` on any inconsistency."""
    stream = memoryview(stream)
    table_index = np.ascontiguousarray(table_index, dtype=np.int32).reshape(-1)
    if len(stream) < 4:
        raise EntropyCodingError("stream shorter than its word-count field")
    n_words = int(np.frombuffer(stream[:4], dtype="<u4")[0])
    # Every symbol emits at most one word: a larger count cannot be a valid stream.
    if n_words > table_index.size + 2 or 4 + 2 * n_words > len(stream):
        raise EntropyCodingError(f"word count {n_words} does not fit the stream or the symbol count")
    words = np.frombuffer(stream[4 : 4 + 2 * n_words], dtype="<u2").astype(np.uint16)
    escapes = np.frombuffer(stream[4 + 2 * n_words :], dtype=np.uint8)
    out = np.empty(table_index.size, dtype=np.int32)
    status = _decode_kernel(words, escapes, table_index, tables.cdfs, tables.cdf_lengths, tables.offsets, out)
    if status != OK:
        raise EntropyCodingError(DECODE_ERRORS[status])
    return out
