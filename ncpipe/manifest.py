"""The Parquet manifests: one row per input sample; schemas defined here and only here.

A job writes one manifest part per input shard (``manifest/<shard>.parquet``); the
parts of a generation together hold every input sample exactly once, identified by
``(source_url, sample_index)`` (keys can repeat in a damaged shard). Failures are rows:
``status`` is ``ok`` or ``error`` and ``error`` says why. Each part carries the job
configuration and ncpipe version as Parquet key-value metadata.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, BinaryIO, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from ncpipe.io.storage import atomic_writer, list_files, read_bytes

STATUS_OK = "ok"
STATUS_ERROR = "error"
LEGACY_COLUMNS = {"rd_lambda": "rate"}  # current name -> the name parts written before it had


def _arrow(type_: pa.DataType, doc: str = "", unit: str = "") -> dict[str, Any]:
    return {"arrow": type_, "doc": doc, "unit": unit}


def _doc(doc: str, unit: str = "") -> dict[str, Any]:
    """A column's meaning and unit, written into the Parquet field metadata (``description``, ``unit``)."""
    return {"doc": doc, "unit": unit}


@dataclass
class ManifestRow:
    """One input sample of a compress job. The Parquet schema is derived from these fields."""

    job_id: str = field(metadata=_doc("the job that wrote the row (its job.json)"))
    source_url: str = field(metadata=_doc("the input shard (credentials redacted)"))
    sample_index: int = field(metadata=_arrow(pa.int32(), "position in the input shard; -1: shard-level error"))
    key: str = field(metadata=_doc("the sample's key: its members' names up to the first '.'"))
    member: str | None = field(default=None, metadata=_arrow(pa.string(), "the image member coded (or that failed)"))
    source_format: str | None = field(default=None, metadata=_doc("format of the image member: JPEG, PNG, ..."))
    source_mode: str | None = field(default=None, metadata=_doc("PIL mode of the source image: RGB, L, P, ..."))
    source_bytes: int | None = field(default=None, metadata=_doc("size of the image member", "bytes"))
    width: int | None = field(default=None, metadata=_arrow(pa.int32(), "image width", "pixels"))
    height: int | None = field(default=None, metadata=_arrow(pa.int32(), "image height", "pixels"))
    compressed_bytes: int | None = field(
        default=None, metadata=_doc("the whole .ncb bitstream, container included", "bytes"))
    bpp: float | None = field(
        default=None, metadata=_doc("8 x compressed_bytes / (width x height)", "bits per pixel"))
    psnr: float | None = field(
        default=None, metadata=_doc("PSNR of the codec's reconstruction against the source, on 8-bit RGB", "dB"))
    ms_ssim: float | None = field(
        default=None, metadata=_doc("MS-SSIM of the reconstruction against the source, 0..1 (1: identical)"))
    model_id: str | None = field(default=None, metadata=_doc("the model as given: registry name or checkpoint path"))
    model_sha256: str | None = field(default=None, metadata=_doc("SHA-256 of the model that wrote the bitstream"))
    rd_lambda: float | None = field(default=None, metadata=_doc(
        "the rate-distortion weight lambda the model was trained with (at the sample's quality level); "
        f"older manifests call it {LEGACY_COLUMNS['rd_lambda']!r}"))
    quality: int | None = field(
        default=None, metadata=_arrow(pa.int16(), "quality level of a variable-rate model; 0: fixed-rate model"))
    encode_seconds: float | None = field(
        default=None, metadata=_doc("the sample's share of device time and entropy coding", "seconds"))
    status: str = field(default=STATUS_OK, metadata=_doc("ok, or error (then 'error' says why)"))
    error: str | None = field(default=None, metadata=_doc("why the sample could not be coded"))
    passthrough: bool = field(default=False, metadata=_doc("the original members were stored unchanged"))
    carried_members: list[str] = field(
        default_factory=list, metadata=_doc("members written to the output shard byte for byte"))
    carried_sha256: list[str] | None = field(default=None, metadata=_arrow(
        pa.list_(pa.string()), "SHA-256 (hex) of each carried member, in carried_members' order; "
        "null in manifests written before digests were recorded"))
    output_shard: str | None = field(default=None, metadata=_doc("the bitstream shard holding the sample"))
    generation: str | None = field(default=None, metadata=_doc("the archive generation this row belongs to"))
    # Lineage, set when recompression re-encoded the sample:
    previous_model_sha256: str | None = field(
        default=None, metadata=_doc("recompressed: SHA-256 of the model of the previous generation's bitstream"))
    previous_compressed_bytes: int | None = field(
        default=None, metadata=_doc("recompressed: the previous generation's bitstream size", "bytes"))
    recompress_source: str | None = field(default=None, metadata=_doc(
        "recompressed: original (re-encoded from the source image) or transcoded (from the old bitstream)"))
    psnr_vs_previous: float | None = field(default=None, metadata=_doc(
        "transcoded: PSNR against the previous generation's reconstruction (the generation loss)", "dB"))
    # CorrDiff, set when the encoder wrote correction coefficients into the bitstream:
    corrdiff_sha256: str | None = field(
        default=None, metadata=_doc("the CorrDiff decoder the bitstream's correction coefficients are for"))
    corrdiff_bytes: int | None = field(default=None, metadata=_arrow(
        pa.int32(), "size of the coefficient extension (counted in compressed_bytes)", "bytes"))


@dataclass
class RestoreRow:
    """One sample of a decompress job."""

    job_id: str = field(metadata=_doc("the restore job that wrote the row"))
    source_url: str = field(metadata=_doc("the bitstream shard read (credentials redacted)"))
    sample_index: int = field(metadata=_arrow(
        pa.int32(), "the sample's sample_index in the archive manifest (its input position; its position in the "
        "shard for bare shards); -1: a sample the manifest does not list, or a shard-level error"))
    key: str = field(metadata=_doc("the sample's key"))
    member: str | None = field(default=None, metadata=_doc("the .ncb member decoded"))
    output: str | None = field(default=None, metadata=_doc("where the restored image (or the unchanged sample) went"))
    width: int | None = field(default=None, metadata=_arrow(pa.int32(), "image width", "pixels"))
    height: int | None = field(default=None, metadata=_arrow(pa.int32(), "image height", "pixels"))
    model_sha256: str | None = field(default=None, metadata=_doc("SHA-256 of the model that decoded the bitstream"))
    decode_seconds: float | None = field(default=None, metadata=_doc(
        "the sample's share of entropy decoding, synthesis and refinement", "seconds"))
    status: str = field(default=STATUS_OK, metadata=_doc("ok, or error (then 'error' says why)"))
    error: str | None = field(default=None, metadata=_doc("why the sample was not restored as asked"))
    refiner_sha256: str | None = field(default=None, metadata=_doc("the NC-Diffusion refiner applied, if any"))
    refine_steps: int | None = field(default=None, metadata=_arrow(pa.int32(), "refiner sampler steps K"))
    guidance: float | None = field(default=None, metadata=_doc("zero-shot guidance strength S, if any"))
    corrdiff_sha256: str | None = field(default=None, metadata=_doc("the CorrDiff decoder that decoded it, if any"))
    perception: float | None = field(default=None, metadata=_doc("CorrDiff's knob p it was decoded at, 0..1"))


_PYTHON_TO_ARROW = {"str": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_(),
                    "list[str]": pa.list_(pa.string())}


def arrow_schema(row_type: type) -> pa.Schema:
    """The Parquet schema of a row dataclass: ``X | None`` fields are nullable."""
    columns = []
    for f in fields(row_type):
        hint = str(f.type)
        nullable = hint.endswith("| None")
        base = hint.removesuffix(" | None")
        described = {key: f.metadata[name] for key, name in (("description", "doc"), ("unit", "unit"))
                     if f.metadata.get(name)}
        columns.append(pa.field(f.name, f.metadata.get("arrow", _PYTHON_TO_ARROW[base]), nullable=nullable,
                                metadata=described or None))
    return pa.schema(columns)


def describe_schema(schema: pa.Schema) -> str:
    """One line per column: name, type, unit and meaning (from the Parquet field metadata)."""
    lines = []
    for column in schema:
        meta = {k.decode(): v.decode() for k, v in (column.metadata or {}).items()}
        unit = f" [{meta['unit']}]" if meta.get("unit") else ""
        lines.append(f"{column.name:26s} {str(column.type):14s}{unit} {meta.get('description', '')}".rstrip())
    return "\n".join(lines)


MANIFEST_SCHEMA = arrow_schema(ManifestRow)
RESTORE_SCHEMA = arrow_schema(RestoreRow)


def printable_name(name: str) -> str:
    """A member name as the manifest stores it: undecodable bytes (kept via surrogateescape) as
    ``\\xNN``, since Parquet strings are UTF-8."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def member_sha256(data: bytes) -> str:
    """The digest the manifest records for a carried member (``carried_sha256``)."""
    return hashlib.sha256(data).hexdigest()


def carried_accounting(per_row: Iterable[list[str] | None]) -> dict[str, Any]:
    """What a commit marker records of a part's carried members, from each row's ``carried_sha256``:
    how many digests, and one SHA-256 over them in row order, so that a digest edited in the
    manifest no longer matches its marker."""
    digests = [digest for row_digests in per_row for digest in (row_digests or ())]
    return {"carried_members": len(digests), "carried_sha256": hashlib.sha256("".join(digests).encode()).hexdigest()}


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


def write_table(table: pa.Table, sink: str | BinaryIO) -> None:
    """A manifest table as Parquet (a name ending .parquet) or CSV (any other name, or a binary stream)."""
    if isinstance(sink, str) and sink.endswith(".parquet"):
        with atomic_writer(sink) as handle:
            pq.write_table(table, handle, compression="zstd")
        return
    import pyarrow.csv as pacsv

    flat = table.select([c for c in table.column_names if not pa.types.is_list(table.schema.field(c).type)])
    lists = [c for c in table.column_names if c not in flat.column_names]
    for name in lists:  # CSV has no lists: join them with spaces
        flat = flat.append_column(name, pa.array([" ".join(v or ()) for v in table[name].to_pylist()]))
    if isinstance(sink, str):
        with atomic_writer(sink) as handle:
            pacsv.write_csv(flat.select(table.column_names), handle)
    else:
        pacsv.write_csv(flat.select(table.column_names), sink)


def read_part(url: str) -> pa.Table:
    """One part file as written (its key-value metadata included)."""
    # ParquetFile reads one file; read_table sets up a dataset for it, twice the time of a small part
    return pq.ParquetFile(pa.BufferReader(read_bytes(url))).read()


def read_manifest(directory_url: str, schema: pa.Schema = MANIFEST_SCHEMA) -> pa.Table:
    """Concatenate every part under a manifest directory (an empty table if none).

    Conformed to ``schema`` once, after concatenation: per part it cost more than reading the part,
    and a job's summary reads every part of its output (thousands, for a large job)."""
    parts = [_current_names(read_part(url)) for url in list_files(directory_url, suffix=".parquet")]
    if not parts:
        return schema.empty_table()
    return conform(pa.concat_tables(parts, promote_options="permissive"), schema)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """A part in ``schema``; a nullable column added after the part was written reads as null."""
    table = _current_names(table)
    for column in schema:
        if column.name not in table.column_names and column.nullable:
            table = table.append_column(column, pa.nulls(table.num_rows, column.type))
    return table.select(schema.names).cast(schema)


def _current_names(table: pa.Table) -> pa.Table:
    """A part with its columns under their current names (LEGACY_COLUMNS)."""
    for current, legacy in LEGACY_COLUMNS.items():
        if legacy in table.column_names and current not in table.column_names:
            table = table.rename_columns([current if name == legacy else name for name in table.column_names])
    return table


def part_metadata(table: pa.Table) -> dict[str, Any]:
    raw = table.schema.metadata or {}
    return {k.decode(): json.loads(v) for k, v in raw.items() if not k.startswith(b"ARROW")}
