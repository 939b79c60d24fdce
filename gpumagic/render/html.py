"""HTML for result objects (no third-party imports): each result's row model as a table.

The rows are the ones the terminal text shows (``gpumagic.render.rows``); registered with the
renderer registry as the "html" view.
"""

from __future__ import annotations

from collections.abc import Iterable
from html import escape
from typing import Any

from gpumagic.render.rows import Table, view
from gpumagic.views import register_view

__all__ = ["html_table", "result_html"]

_STYLE = (
    "border-collapse:collapse;font-family:var(--jp-code-font-family,monospace);font-size:12px;"
    "margin:4px 0"
)


def html_table(title: str, rows: Iterable[tuple[str, str]], *, kind: str = "report") -> str:
    """A two-column key/value table with a caption; every value is escaped."""
    body = "".join(
        f'<tr><th style="text-align:left;padding:1px 10px 1px 0;font-weight:600;vertical-align:top">'
        f'{escape(k)}</th><td style="text-align:left;padding:1px 0;white-space:pre-wrap">{escape(v)}</td></tr>'
        for k, v in rows
    )
    return (
        f'<table class="gpumagic-{escape(kind)}" style="{_STYLE}">'
        f'<caption style="text-align:left;font-weight:600;padding-bottom:2px">{escape(title)}</caption>'
        f"{body}</table>"
    )


def _columns(table: Table) -> str:
    def cells(row: tuple[str, ...], tag: str) -> str:
        return "".join(
            f'<{tag} style="text-align:{"right" if i in table.right else "left"};padding:1px 8px 1px 0">'
            f"{escape(c)}</{tag}>" for i, c in enumerate(row)
        )

    caption = ("" if table.title is None else
               f'<caption style="text-align:left;font-weight:600;padding-bottom:2px">{escape(table.title)}</caption>')
    return (f'<table class="gpumagic-trials" style="{_STYLE}">{caption}<tr>{cells(table.header, "th")}</tr>'
            + "".join(f"<tr>{cells(row, 'td')}</tr>" for row in table.body) + "</table>")


def result_html(result: Any) -> str:
    """A result's rows as a captioned table, then its tables (a search's trials)."""
    v = view(result)
    return html_table(v.title, ((r.label, r.value) for r in v.rows)) + "".join(
        _columns(t) for t in v.tables)


for _name in ("MemoryReport", "BatchSearchResult", "DeviceStatus", "SweepResult"):  # the results with a row model
    register_view("html", _name, result_html)
