"""Result tables: Markdown and CSV writers, reading CSV back, mean ± std aggregation over repeated runs."""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from l2sp.errors import L2SPError
from l2sp.io import atomic_write_text


def _fmt(value, digits: int) -> str:
    """Floats: ``digits`` decimals, or ``digits`` significant digits below 0.1 and from 1e6 on."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) < 0.1 or abs(value) >= 1e6):
            return f"{value:.{digits}g}"
        return f"{value:.{digits}f}"
    return str(value)


def _columns(rows: Sequence[Mapping], columns: Sequence[str] | None) -> list[str]:
    if columns is not None:
        return list(columns)
    return list(dict.fromkeys(k for row in rows for k in row))


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str] | None = None, *, digits: int = 3) -> str:
    """A GitHub Markdown table of ``rows`` (dicts); floats with ``digits`` decimals, missing cells empty."""
    cols = _columns(rows, columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_fmt(r[c], digits) if c in r else "" for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def csv_text(rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> str:
    """``rows`` as CSV text with a header line (full float precision)."""
    buf = io.StringIO()
    writer = csv.DictWriter(
        buf, fieldnames=_columns(rows, columns), extrasaction="ignore", lineterminator="\n"
    )
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> Path:
    """Write ``rows`` to ``path`` as CSV, atomically."""
    return atomic_write_text(path, csv_text(rows, columns))


def write_markdown(
    path: str | os.PathLike,
    rows: Sequence[Mapping],
    columns: Sequence[str] | None = None,
    *,
    title: str | None = None,
    digits: int = 3,
) -> Path:
    """Write ``rows`` to ``path`` as a Markdown table (with an optional ``# title``), atomically."""
    text = (f"# {title}\n\n" if title else "") + markdown_table(rows, columns, digits=digits)
    return atomic_write_text(path, text)


def read_csv(path: str | os.PathLike) -> list[dict]:
    """Rows of a CSV file; cells that parse as numbers become floats."""
    path = Path(path)
    if not path.is_file():
        raise L2SPError(f"no such table: {path}; pass a CSV file with a header line")

    def parse(v: str):
        try:
            return float(v)
        except ValueError:
            return v

    with open(path, newline="", encoding="utf-8") as f:
        rows = [{k: parse(v) for k, v in row.items()} for row in csv.DictReader(f)]
    if not rows:
        raise L2SPError(f"{path} holds no rows; pass a CSV file with a header line and data")
    return rows


def require_columns(rows: Sequence[Mapping], columns: Sequence[str], what: str = "the table") -> None:
    """L2SPError naming the missing columns and the available ones."""
    have = _columns(rows, None)
    missing = [c for c in columns if c not in have]
    if missing:
        raise L2SPError(f"{what} lacks column(s) {', '.join(missing)}; its columns: {', '.join(have)}")


def aggregate(rows: Sequence[Mapping], by: Sequence[str], value: str) -> list[dict]:
    """Group ``rows`` by the ``by`` columns: mean, sample std (ddof=1, 0 for one run) and n of ``value``."""
    require_columns(rows, [*by, value])
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in by), []).append(float(r[value]))
    out = []
    for key, vals in groups.items():
        n = len(vals)
        mean = sum(vals) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
        out.append({**dict(zip(by, key)), "mean": mean, "std": std, "n": n})
    return out
