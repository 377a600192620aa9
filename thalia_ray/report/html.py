"""The report's HTML pieces: images, notes, tables, sections and the page around them.

Figures are embedded as PNG data URIs and the style is inline, so a page is one self-contained file
(no scripts, no fonts or anything else from the network) that opens anywhere, also from S3. Every
piece of text is escaped here, so a dataset's names cannot inject markup.
"""
from __future__ import annotations

import base64
import html
from typing import Any, Sequence

from thalia_ray.tables import Table, render

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #1f2328; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .9em; }
caption { text-align: left; color: #57606a; padding: .2em 0; }
th, td { border: 1px solid #d0d7de; padding: .25em .6em; text-align: right; }
th { background: #f6f8fa; } td.text, th.text { text-align: left; }
img { max-width: 100%; display: block; margin: .6em 0; }
.note { color: #57606a; font-style: italic; }
.stopped { color: #cf222e; }
"""


def image(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], row_classes: Sequence[str] = (),
          title: str = "") -> str:
    """An HTML table (the package's one renderer); `row_classes` gives a CSS class per row (e.g. "stopped")."""
    return render(Table(header, rows, title, row_classes), "html")


def section(title: str, *parts: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>{''.join(parts)}</section>"


def document(title: str, subtitle: str, sections: Sequence[str]) -> str:
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{note(subtitle)}"
            f"{''.join(sections)}</body></html>\n")
