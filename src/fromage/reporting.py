"""Results as people read them: one markdown table writer and one JSON writer."""

from __future__ import annotations

import json
from pathlib import Path


def markdown_table(rows: dict[str, dict[str, float | int | str]], digits: int = 2) -> str:
    """Rows named by their first cell; columns are the union of the rows' keys, in order."""
    columns = list(dict.fromkeys(key for values in rows.values() for key in values))
    lines = ["| | " + " | ".join(columns) + " |", "| --- |" + " ---: |" * len(columns)]
    for name, values in rows.items():
        cells = [_cell(values.get(column, ""), digits) for column in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: float | int | str, digits: int) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def write_json(path: str | Path, results: dict) -> Path:
    """Write ``results`` as indented JSON, creating the parent directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path
