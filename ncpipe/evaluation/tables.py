"""Markdown tables for the evaluation summaries: one header line, one alignment line, one line per row."""

from __future__ import annotations

from typing import Iterable, Sequence

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
