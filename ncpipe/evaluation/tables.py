"""What every evaluation writes: its result tables (Parquet with the run's metadata, CSV) and markdown
tables (one header line, one alignment line, one line per row)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Sequence

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ncpipe.io.storage import atomic_writer
from ncpipe.manifest import arrow_schema

LEFT, RIGHT = "---", "---:"


def markdown_table(columns: Sequence[tuple[str, str]], rows: Iterable[Sequence[object]]) -> list[str]:
    """``columns``: (header, LEFT or RIGHT) each; ``rows``: cells already formatted (or ``str()``-able)."""
    lines = ["| " + " | ".join(name for name, _ in columns) + " |",
             "| " + " | ".join(align for _, align in columns) + " |"]
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"a row of {len(row)} cells for {len(columns)} columns")
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return lines


def write_file(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """``write(handle)`` into ``path``, which appears whole or not at all; returns ``path``."""
    with atomic_writer(str(path)) as handle:
        write(handle)
    return path


def text_writer(text: str) -> Callable[[BinaryIO], object]:
    return lambda handle: handle.write(text.encode())


def write_result_tables(output: Path, rows: Sequence[Any], row_type: type, summary: Sequence[Any],
                        summary_type: type, metadata: dict[str, Any]) -> list[Path]:
    """``results.parquet`` (the run's ``metadata`` as JSON in its schema metadata), ``results.csv`` and
    ``summary.csv`` in ``output``; each table's schema comes from its row dataclass."""
    output.mkdir(parents=True, exist_ok=True)
    encoded = {k: json.dumps(v, default=str) for k, v in metadata.items()}
    results = pa.Table.from_pylist([asdict(r) for r in rows], schema=arrow_schema(row_type))
    results = results.replace_schema_metadata(encoded)
    table = pa.Table.from_pylist([asdict(s) for s in summary], schema=arrow_schema(summary_type))
    return [
        write_file(output / "results.parquet", lambda h: pq.write_table(results, h, compression="zstd")),
        write_file(output / "results.csv", lambda h: pacsv.write_csv(results, h)),
        write_file(output / "summary.csv", lambda h: pacsv.write_csv(table, h)),
    ]
