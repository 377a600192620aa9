"""The one table renderer: every table the package prints or writes (leaderboards, run and job lists,
benchmark results, the report's HTML tables) is a `Table` rendered here.

For people (terminal, markdown, html) numbers are shortened and a missing value is a dash; for
programs (csv, json) values keep full precision, a missing value is an empty CSV cell or a JSON
null, and there is no title line, so `pandas.read_csv` and `json.load` read the text as it is.
CSV cells holding text that a spreadsheet would run as a formula are neutralised (OWASP's rule).
This module imports nothing from the package: every layer may use it.
"""
from __future__ import annotations

import csv
import html
import io
import json
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

FORMATS = ("terminal", "markdown", "csv", "json", "html")
FOR_PEOPLE = ("terminal", "markdown", "html")
MISSING = "—"
# A spreadsheet evaluates a cell starting with one of these as a formula (=, +, - and @ start one;
# a tab or carriage return can hide such a start from a later parser).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


@dataclass(frozen=True)
class Table:
    """A header and rows of plain values (str, int, float, bool, None, lists; a (mean, spread) tuple
    reads as `mean ± spread`). `title` is a line above it for people; `row_classes` are CSS classes
    per row in HTML (e.g. "stopped")."""

    header: Sequence[str]
    rows: Sequence[Sequence[Any]]
    title: str = ""
    row_classes: Sequence[str] = field(default_factory=tuple)


def render(table: Table, fmt: str) -> str:
    """`table` as text in one of FORMATS."""
    if fmt not in RENDERERS:
        raise ValueError(f"table format {fmt!r}: choose one of {', '.join(FORMATS)}")
    return RENDERERS[fmt](table)


def render_all(tables: Sequence[Table], fmt: str) -> str:
    """Several tables for people, each under its title, separated by a blank line."""
    if fmt not in FOR_PEOPLE:
        raise ValueError(f"format {fmt!r} holds one table; several are for people ({', '.join(FOR_PEOPLE)})")
    return "\n\n".join(render(t, fmt) for t in tables)


# ------------------------------------------------------------------------------------- cells
def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def human(value: Any) -> str:
    """A cell for people: 4 significant digits (thousands grouped from 10,000), `mean ± spread`."""
    if isinstance(value, tuple) and len(value) == 2 and all(_number(v) for v in value):
        mean, spread = value
        return MISSING if math.isnan(mean) else f"{mean:.3f} ± {spread:.3f}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return MISSING if math.isnan(value) else str(value)
        return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(human(v) for v in value)
    return MISSING if value is None else str(value)


def plain(value: Any) -> Any:
    """A cell for programs: NaN and infinities are missing (None); anything else unchanged."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, tuple):
        return [plain(v) for v in value]
    return value


def neutralised(text: str) -> str:
    """Text that a spreadsheet shows as it is: a leading formula character gets a single quote."""
    return f"'{text}" if text.startswith(FORMULA_STARTS) else text


def _csv_cell(value: Any) -> Any:
    """Numbers as Python writes them (a negative number stays a number), lists as JSON, text neutralised."""
    value = plain(value)
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return neutralised(json.dumps(value))
    return value if _number(value) or isinstance(value, bool) else neutralised(str(value))


def _numeric_columns(table: Table) -> list[bool]:
    """Columns whose present values are all numbers: aligned right for people."""
    return [all(_number(row[i]) or row[i] is None for row in table.rows) and any(_number(row[i]) for row in table.rows)
            for i in range(len(table.header))]


# ------------------------------------------------------------------------------------- formats
def _terminal(table: Table) -> str:
    cells = [[human(v) for v in row] for row in table.rows]
    right = _numeric_columns(table)
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(table.header)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right)).rstrip()

    lines = [line(list(table.header)), line(["-" * w for w in widths]), *map(line, cells)]
    return "\n".join([table.title, *lines] if table.title else lines)


def _markdown(table: Table) -> str:
    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"

    right = _numeric_columns(table)
    rule = "|" + "|".join("---:" if r else "---" for r in right) + "|"
    lines = [line(list(table.header)), rule, *(line([human(v) for v in row]) for row in table.rows)]
    return "\n".join([table.title, "", *lines] if table.title else lines)


def _csv(table: Table) -> str:
    """RFC 4180 CSV: CRLF line ends, so that a line break of either kind inside a cell is quoted."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([neutralised(h) for h in table.header])
    writer.writerows([[_csv_cell(v) for v in row] for row in table.rows])
    return buffer.getvalue().removesuffix("\r\n")


def _json(table: Table) -> str:
    """A JSON array with one object per row."""
    return json.dumps([{h: plain(v) for h, v in zip(table.header, row)} for row in table.rows], indent=2)


def _html(table: Table) -> str:
    """An HTML table; text cells (class "text") align left, numbers right."""
    right = _numeric_columns(table)

    def cell(tag: str, value: Any, numeric: bool) -> str:
        css = "" if numeric else ' class="text"'
        return f"<{tag}{css}>{html.escape(human(value))}</{tag}>"

    body = []
    for i, row in enumerate(table.rows):
        css = table.row_classes[i] if i < len(table.row_classes) else ""
        attr = f' class="{html.escape(css)}"' if css else ""
        body.append(f"<tr{attr}>{''.join(cell('td', v, r) for v, r in zip(row, right))}</tr>")
    head = "".join(cell("th", h, False) for h in table.header)
    caption = f"<caption>{html.escape(table.title)}</caption>" if table.title else ""
    return f"<table>{caption}<tr>{head}</tr>{''.join(body)}</table>"


RENDERERS = {"terminal": _terminal, "markdown": _markdown, "csv": _csv, "json": _json, "html": _html}
