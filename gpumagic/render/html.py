"""Small HTML tables for result objects (no third-party imports)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from html import escape

__all__ = ["html_grid", "html_table"]

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


def html_grid(title: str, header: Sequence[str], rows: Iterable[Sequence[str]], *, kind: str = "what-if") -> str:
    """A table with a header row and a caption; every cell is escaped."""
    cell = "text-align:left;padding:1px 10px 1px 0;vertical-align:top"
    head = "".join(f'<th style="{cell};font-weight:600">{escape(h)}</th>' for h in header)
    body = "".join("<tr>" + "".join(f'<td style="{cell}">{escape(v)}</td>' for v in r) + "</tr>" for r in rows)
    return (
        f'<table class="gpumagic-{escape(kind)}" style="{_STYLE}">'
        f'<caption style="text-align:left;font-weight:600;padding-bottom:2px">{escape(title)}</caption>'
        f"<tr>{head}</tr>{body}</table>"
    )
