"""The numba rANS coder: exact round trips, escapes, and refusal of damaged streams."""

import numpy as np
import pytest
from compressai.entropy_models import GaussianConditional
from compressai.models.base import get_scale_table

from ncpipe.entropy import rans
from ncpipe.entropy.tables import CdfTables, TableError


@pytest.fixture(scope="module")
def gaussian_tables() -> CdfTables:
    conditional = GaussianConditional(None)
    conditional.update_scale_table(get_scale_table())
    return CdfTables.from_tensors(conditional._quantized_cdf, conditional._cdf_length, conditional._offset)


def _symbols(tables: CdfTables, n: int, seed: int, spread: float = 1.0):
    rng = np.random.default_rng(seed)
    index = rng.integers(0, tables.num_tables, n).astype(np.int32)
    scale = np.exp(np.linspace(np.log(0.11), np.log(256), tables.num_tables))[index]
    values = np.round(rng.normal(0, scale * spread)).astype(np.int32)
    return values, index


@pytest.mark.parametrize("n", [0, 1, 7, 10_000])
def test_round_trip(gaussian_tables, n):
    values, index = _symbols(gaussian_tables, n, seed=n)
    stream = rans.encode(values, index, gaussian_tables)
    np.testing.assert_array_equal(rans.decode(stream, index, gaussian_tables), values)


def test_values_beyond_the_tables_use_escapes(gaussian_tables):
    values, index = _symbols(gaussian_tables, 5000, seed=1, spread=30.0)
    values[::97] = rans.MAX_ESCAPED_MAGNITUDE  # far outside every table
    values[1::89] = -rans.MAX_ESCAPED_MAGNITUDE
    stream = rans.encode(values, index, gaussian_tables)
    np.testing.assert_array_equal(rans.decode(stream, index, gaussian_tables), values)


def test_rate_close_to_the_model_entropy(gaussian_tables):
    """rANS overhead over the ideal code length of the quantized tables is tiny."""
    values, index = _symbols(gaussian_tables, 50_000, seed=2)
    ideal_bits = 0.0
    for v, k in zip(values, index):
        s = min(max(v - gaussian_tables.offsets[k], 0), gaussian_tables.cdf_lengths[k] - 2)
        freq = gaussian_tables.cdfs[k, s + 1] - gaussian_tables.cdfs[k, s]
        ideal_bits -= np.log2(freq / rans.PROB_TOTAL)
    actual_bits = 8 * len(rans.encode(values, index, gaussian_tables))
    assert actual_bits <= ideal_bits * 1.01 + 64


def test_value_beyond_the_codable_range_is_refused(gaussian_tables):
    values = np.array([rans.MAX_ESCAPED_MAGNITUDE + 1], dtype=np.int32)
    with pytest.raises(rans.EntropyCodingError, match="exceeds"):
        rans.encode(values, np.zeros(1, np.int32), gaussian_tables)


def test_every_truncation_and_byte_flip_is_detected_or_harmless(gaussian_tables):
    values, index = _symbols(gaussian_tables, 400, seed=3)
    stream = rans.encode(values, index, gaussian_tables)
    for cut in range(len(stream)):
        with pytest.raises(rans.EntropyCodingError):
            rans.decode(stream[:cut], index, gaussian_tables)
    rng = np.random.default_rng(0)
    for position in rng.integers(0, len(stream), 200):
        damaged = bytearray(stream)
        damaged[position] ^= 1 << int(rng.integers(8))
        try:
            decoded = rans.decode(bytes(damaged), index, gaussian_tables)
        except rans.EntropyCodingError:
            continue
        assert decoded.shape == values.shape  # decoded something of the right size, never crashed


def test_tables_are_validated():
    good = np.array([[0, 30000, 65535, 65536]], dtype=np.int32)
    CdfTables(good, np.array([4], np.int32), np.array([-1], np.int32))
    with pytest.raises(TableError, match="strictly increasing"):
        CdfTables(np.array([[0, 30000, 30000, 65536]], np.int32), np.array([4], np.int32), np.array([0], np.int32))
    with pytest.raises(TableError, match="length"):
        CdfTables(good, np.array([9], np.int32), np.array([0], np.int32))
