"""The Parquet manifests: one row per input sample; schemas defined here and only here.

A job writes one manifest part per input shard (``manifest/<shard>.parquet``); the
parts of a generation together hold every input sample exactly once, identified by
``(source_url, sample_index)`` (keys can repeat in a damaged shard). Failures are rows:
``status`` is ``ok`` or ``error`` and ``error`` says why. Each part carries the job
configuration and ncpipe version as Parquet key-value metadata.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from ncpipe.io.storage import atomic_writer, list_files, read_bytes

STATUS_OK = "ok"
STATUS_ERROR = "error"


def _arrow(type_: pa.DataType, doc: str = "") -> dict[str, Any]:
    return {"arrow": type_, "doc": doc}


@dataclass
class ManifestRow:
    """One input sample of a compress job. The Parquet schema is derived from these fields."""

    job_id: str
    source_url: str
    sample_index: int = field(metadata=_arrow(pa.int32(), "position in the input shard; -1: shard-level error"))
    key: str
    member: str | None = field(default=None, metadata=_arrow(pa.string(), "the image member coded (or that failed)"))
    source_format: str | None = None  # JPEG, PNG, ...
    source_mode: str | None = None  # RGB, L, P, ...
    source_bytes: int | None = None
    width: int | None = field(default=None, metadata=_arrow(pa.int32()))
    height: int | None = field(default=None, metadata=_arrow(pa.int32()))
    compressed_bytes: int | None = None  # the whole .ncb bitstream, container included
    bpp: float | None = None
    psnr: float | None = None  # dB, on 8-bit RGB
    ms_ssim: float | None = None
    model_id: str | None = None  # registry name, or the checkpoint path
    model_sha256: str | None = None
    rate: float | None = None  # the rate parameter λ the sample was coded at (its quality level's)
    quality: int | None = field(
        default=None, metadata=_arrow(pa.int16(), "quality level of a variable-rate model; 0: fixed-rate model"))
    encode_seconds: float | None = None  # amortised share of device time + entropy coding
    status: str = STATUS_OK
    error: str | None = None
    passthrough: bool = False  # the original members were stored unchanged
    carried_members: list[str] = field(default_factory=list)
    output_shard: str | None = None
    generation: str | None = None  # the archive generation this row belongs to
    # Lineage, set when recompression re-encoded the sample:
    previous_model_sha256: str | None = None
    previous_compressed_bytes: int | None = None
    recompress_source: str | None = None  # "original" (re-encoded) or "transcoded" (from the old bitstream)
    psnr_vs_previous: float | None = None  # transcoded: generation loss against the previous reconstruction
    # CorrDiff, set when the encoder wrote correction coefficients into the bitstream:
    corrdiff_sha256: str | None = None  # the CorrDiff decoder they were computed for
    corrdiff_bytes: int | None = field(
        default=None, metadata=_arrow(pa.int32(), "bytes of the coefficient extension (counted in compressed_bytes)"))


@dataclass
class RestoreRow:
    """One sample of a decompress job."""

    job_id: str
    source_url: str
    sample_index: int = field(metadata=_arrow(pa.int32()))
    key: str
    member: str | None = None  # the .ncb member decoded
    output: str | None = None  # where the restored image (or the unchanged sample) went
    width: int | None = field(default=None, metadata=_arrow(pa.int32()))
    height: int | None = field(default=None, metadata=_arrow(pa.int32()))
    model_sha256: str | None = None
    decode_seconds: float | None = None  # entropy decoding + synthesis (+ refinement) share
    status: str = STATUS_OK
    error: str | None = None
    refiner_sha256: str | None = None  # the diffusion refiner applied, if any
    refine_steps: int | None = field(default=None, metadata=_arrow(pa.int32()))
    guidance: float | None = None  # zero-shot guidance strength S, if any
    corrdiff_sha256: str | None = None  # the CorrDiff decoder that decoded the sample, if any
    perception: float | None = None  # CorrDiff's knob p it was decoded at


_PYTHON_TO_ARROW = {"str": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_(),
                    "list[str]": pa.list_(pa.string())}


def arrow_schema(row_type: type) -> pa.Schema:
    """The Parquet schema of a row dataclass: ``X | None`` fields are nullable."""
    columns = []
    for f in fields(row_type):
        hint = str(f.type)
        nullable = hint.endswith("| None")
        base = hint.removesuffix(" | None")
        columns.append(pa.field(f.name, f.metadata.get("arrow", _PYTHON_TO_ARROW[base]), nullable=nullable))
    return pa.schema(columns)


MANIFEST_SCHEMA = arrow_schema(ManifestRow)
RESTORE_SCHEMA = arrow_schema(RestoreRow)


def rows_to_table(rows: Iterable[Any], schema: pa.Schema, metadata: dict[str, Any] | None = None) -> pa.Table:
    table = pa.Table.from_pylist([asdict(row) for row in rows], schema=schema)
    if metadata:
        table = table.replace_schema_metadata({k: json.dumps(v) for k, v in metadata.items()})
    return table


def write_part(rows: Iterable[Any], schema: pa.Schema, url: str, metadata: dict[str, Any]) -> None:
    """Write one part atomically (temp + rename, or a single object PUT)."""
    table = rows_to_table(rows, schema, metadata)
    with atomic_writer(url) as handle:
        pq.write_table(table, handle, compression="zstd")


def write_manifest_part(rows: Iterable[ManifestRow], url: str, metadata: dict[str, Any]) -> None:
    write_part(rows, MANIFEST_SCHEMA, url, metadata)


def write_restore_part(rows: Iterable[RestoreRow], url: str, metadata: dict[str, Any]) -> None:
    write_part(rows, RESTORE_SCHEMA, url, metadata)


def read_part(url: str) -> pa.Table:
    return pq.read_table(io.BytesIO(read_bytes(url)))


def read_manifest(directory_url: str, schema: pa.Schema = MANIFEST_SCHEMA) -> pa.Table:
    """Concatenate every part under a manifest directory (an empty table if none)."""
    parts = [conform(read_part(url), schema) for url in list_files(directory_url, suffix=".parquet")]
    return pa.concat_tables(parts) if parts else schema.empty_table()


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """A part in ``schema``; a nullable column added after the part was written reads as null."""
    for column in schema:
        if column.name not in table.column_names and column.nullable:
            table = table.append_column(column, pa.nulls(table.num_rows, column.type))
    return table.select(schema.names).cast(schema)


def part_metadata(table: pa.Table) -> dict[str, Any]:
    raw = table.schema.metadata or {}
    return {k.decode(): json.loads(v) for k, v in raw.items() if not k.startswith(b"ARROW")}
