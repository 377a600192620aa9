"""The one table renderer: people's formats shorten and align, programs' formats keep everything and
load as they are, CSV text cannot become a spreadsheet formula."""
from __future__ import annotations

import csv
import io
import json
import math

import pandas as pd
import pytest

from thalia_ray.tables import Table, neutralised, render, render_all

TABLE = Table(["run", "lr", "f1", "seeds", "note"],
              [["a", 3e-4, 0.81234, [0, 1], None], ["bb", 1e-3, math.nan, [0], "ok"]], title="ranked by val")


def test_terminal_aligns_numbers_right_and_shows_missing_values_as_a_dash():
    lines = render(TABLE, "terminal").splitlines()
    assert lines[0] == "ranked by val"
    assert lines[1].split() == ["run", "lr", "f1", "seeds", "note"]
    assert lines[3].split() == ["a", "0.0003", "0.8123", "0,", "1", "—"]
    assert lines[4].split() == ["bb", "0.001", "—", "0", "ok"]
    assert lines[3].index("0.0003") + len("0.0003") == lines[4].index("0.001") + len("0.001")  # right-aligned
    assert lines[3].index("a") == lines[4].index("bb")  # text left-aligned


def test_people_get_short_numbers_and_spread():
    table = Table(["x"], [[12345.678], [0.6], [(0.6, 0.1414)], [float("inf")]])
    assert [line.strip() for line in render(table, "terminal").splitlines()[2:]] == ["12,346", "0.6", "0.600 ± 0.141",
                                                                                    "inf"]


def test_markdown_escapes_pipes_and_marks_numeric_columns():
    text = render(Table(["name", "n"], [["a|b", 1]]), "markdown")
    assert text.splitlines() == ["| name | n |", "|---|---:|", "| a\\|b | 1 |"]


def test_csv_and_json_load_as_they_are_with_full_precision():
    frame = pd.read_csv(io.StringIO(render(TABLE, "csv")))
    assert frame["f1"].iloc[0] == 0.81234 and pd.isna(frame["f1"].iloc[1]) and frame["lr"].iloc[0] == 3e-4
    assert json.loads(frame["seeds"].iloc[0]) == [0, 1]
    rows = json.loads(render(TABLE, "json"))
    assert rows[1] == {"run": "bb", "lr": 1e-3, "f1": None, "seeds": [0], "note": "ok"}
    assert "ranked by val" not in render(TABLE, "csv") + render(TABLE, "json")  # titles are for people


@pytest.mark.parametrize("text", ["=HYPERLINK(\"http://evil\")", "+cmd|' /C calc'!A0", "-2+3", "@SUM(A1)",
                                  "\t=1", "\r=1"])
def test_csv_text_that_a_spreadsheet_would_run_is_quoted(text):
    rows = list(csv.reader(io.StringIO(render(Table(["name", "value"], [[text, -0.5]]), "csv"), newline="")))
    assert rows[1] == ["'" + text, "-0.5"]  # the number stays a number


def test_only_formula_starts_are_neutralised():
    assert neutralised("Campi Flegrei") == "Campi Flegrei" and neutralised("a=b") == "a=b"
    header = list(csv.reader(io.StringIO(render(Table(["=x"], [[1]]), "csv"))))[0]
    assert header == ["'=x"]


def test_html_escapes_text_and_marks_rows():
    text = render(Table(["name", "n"], [["<b>x</b>", 2], ["y", None]], "cap", ["stopped"]), "html")
    assert "&lt;b&gt;x&lt;/b&gt;" in text and "<b>" not in text
    assert '<tr class="stopped"><td class="text">' in text and "<td>2</td>" in text
    assert "<caption>cap</caption>" in text


def test_several_tables_are_for_people_only():
    assert render_all([TABLE, TABLE], "terminal").count("ranked by val") == 2
    with pytest.raises(ValueError, match="one table"):
        render_all([TABLE], "csv")
    with pytest.raises(ValueError, match="choose one of"):
        render(TABLE, "xml")
